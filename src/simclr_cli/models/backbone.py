"""ResNet encoders from torchvision, without their classifier.

The small-image stem replaces the 7x7 stride-2 convolution and the max-pool with one 3x3
stride-1 convolution, as the SimCLR paper does for CIFAR-10 (appendix B.9); without it a
32 px image is reduced to 1x1 before the last stage.

Wider ResNets (`resnet50x2`, `resnet152x3`, ...) multiply every channel count, the stem's
included, by the factor: the layout of the official SimCLR v1/v2 checkpoints (paper, section
6; converted to PyTorch by tonylins/simclr-converter and Separius/SimCLRv2-Pytorch). This is
not torchvision's `wide_resnet50_2`, which widens only the inner 3x3 convolutions.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import torch
import torchvision.models as tv_models
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from simclr_cli.errors import ConfigError
from simclr_cli.models.small_map_conv import use_small_map_convs

__all__ = ["Backbone", "feature_dim", "folded_for_inference", "parse_arch"]

_FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
}
_WIDE_ARCH = re.compile(r"(resnet(?:50|101|152))x([1-4])")  # bottleneck nets only


def parse_arch(arch: str) -> tuple[str, int]:
    """(torchvision depth name, width multiplier) of an architecture name."""
    wide = _WIDE_ARCH.fullmatch(arch)
    if wide:
        return wide.group(1), int(wide.group(2))
    if arch in _FEATURE_DIMS:
        return arch, 1
    raise ConfigError(
        f"unknown architecture {arch!r}; choose one of {', '.join(_FEATURE_DIMS)} "
        "(ResNet-50/101/152 also as e.g. resnet50x2 for 2x wider)"
    )


def feature_dim(arch: str) -> int:
    """Width of the pooled features an architecture produces."""
    depth, width = parse_arch(arch)
    return _FEATURE_DIMS[depth] * width


class Backbone(nn.Module):
    """A ResNet trunk that maps (B, 3, H, W) images to (B, feature_dim) features."""

    def __init__(self, arch: str, *, small_stem: bool) -> None:
        """Build an untrained trunk; weights are loaded separately when needed."""
        super().__init__()
        depth, width = parse_arch(arch)
        factory: Callable[..., tv_models.ResNet] = getattr(tv_models, depth)
        resnet = factory(weights=None)
        if width > 1:
            _widen(resnet, width)
        if small_stem:
            resnet.conv1 = nn.Conv2d(3, 64 * width, kernel_size=3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
        resnet.fc = nn.Identity()
        # Faster bf16 training of the last stage on CPUs; same parameters and results.
        use_small_map_convs(resnet)
        self.resnet = resnet
        self.arch = arch
        self.small_stem = small_stem
        self.feature_dim = feature_dim(arch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features, (B, feature_dim)."""
        features: torch.Tensor = self.resnet(images)
        return features


def folded_for_inference(backbone: Backbone) -> Backbone:
    """A copy for inference with every batch norm folded into the convolution before it.

    In eval mode a batch norm is a fixed per-channel scale and shift, so it can live in the
    convolution's weights and bias: the same function (float32 rounding apart: 4e-6 at most
    on a 96 px ResNet-18's features), one pass over each activation fewer. Measured 309 ->
    352 images/s for that model on two CPU cores (benchmarks/README.md). The original is left
    untouched, so it can still be trained or fingerprinted; a norm without running
    statistics (which normalises by the batch even in eval mode) is kept as it is.
    """
    folded = copy.deepcopy(backbone).eval()
    resnet = folded.resnet
    pairs: list[tuple[nn.Module, str, str]] = [(resnet, "conv1", "bn1")]
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"bn{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))  # Sequential(conv, norm)
    for parent, conv_name, norm_name in pairs:
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        if not (
            isinstance(conv, nn.Conv2d)
            and isinstance(norm, nn.BatchNorm2d)
            and norm.running_mean is not None
            and norm.running_var is not None
        ):
            continue
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
        setattr(parent, norm_name, nn.Identity())
    return folded


def _widen(resnet: tv_models.ResNet, width: int) -> None:
    """Rebuild stem and stages with every channel count times `width` (SimCLR's RN50 (kx))."""
    blocks = [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]
    resnet.inplanes = 64 * width  # torchvision's _make_layer reads and advances this
    resnet.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = nn.BatchNorm2d(64 * width)
    block = tv_models.resnet.Bottleneck
    resnet.layer1 = resnet._make_layer(block, 64 * width, blocks[0])
    resnet.layer2 = resnet._make_layer(block, 128 * width, blocks[1], stride=2)
    resnet.layer3 = resnet._make_layer(block, 256 * width, blocks[2], stride=2)
    resnet.layer4 = resnet._make_layer(block, 512 * width, blocks[3], stride=2)
    # Same initialisation torchvision gives its own layers, so a wide net can also be trained.
    for module in resnet.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
