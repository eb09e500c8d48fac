"""ResNet encoders from torchvision, without their classifier.

The small-image stem replaces the 7x7 stride-2 convolution and the max-pool with one 3x3
stride-1 convolution, as the SimCLR paper does for CIFAR-10 (appendix B.9); without it a
32 px image is reduced to 1x1 before the last stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.models as tv_models
from torch import nn

from simclr_cli.errors import ConfigError

__all__ = ["Backbone", "feature_dim"]

_FEATURE_DIMS = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
}


def feature_dim(arch: str) -> int:
    """Width of the pooled features an architecture produces."""
    try:
        return _FEATURE_DIMS[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}") from None


class Backbone(nn.Module):
    """A ResNet trunk that maps (B, 3, H, W) images to (B, feature_dim) features."""

    def __init__(self, arch: str, *, small_stem: bool) -> None:
        """Build an untrained trunk; weights are loaded separately when needed."""
        super().__init__()
        factory: Callable[..., tv_models.ResNet] | None = getattr(tv_models, arch, None)
        if factory is None or arch not in _FEATURE_DIMS:
            raise ConfigError(f"unknown architecture {arch!r}")
        resnet = factory(weights=None)
        if small_stem:
            resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
        resnet.fc = nn.Identity()
        self.resnet = resnet
        self.arch = arch
        self.small_stem = small_stem
        self.feature_dim = _FEATURE_DIMS[arch]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features, (B, feature_dim)."""
        features: torch.Tensor = self.resnet(images)
        return features
