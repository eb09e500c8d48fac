"""Other projects' ResNet checkpoints, mapped onto our encoder.

Recognised layouts (key names and shapes learned from the public converters; no code taken):

- SimCLR v1, official TensorFlow weights converted by tonylins/simclr-converter (published
  as lightly-ai/simclrv1-imagenet1k-resnet50-{1x,2x,4x}, file `resnet50-{1,2,4}x.pth`):
  `{"state_dict": ...}` with torchvision ResNet names (`conv1.weight`, `layer1.0.conv1.weight`,
  ..., `fc.*` for the supervised 1000-class head), every channel count times the width.
- SimCLR v2 converted by Separius/SimCLRv2-Pytorch (lightly-ai/simclrv2-imagenet1k-r*_sk0,
  file `r50_1x_sk0.pth`): `{"resnet": ..., "head": ...}` with a stem `net.0`, stages
  `net.1`-`net.4` of `blocks.N` (`net.0`..`net.5` inside a block: conv, bn, conv, bn, conv, bn;
  `projection.shortcut`/`projection.bn` for the downsampling path) and a three-layer
  contrastive head. Selective-kernel (`_sk1`) nets have no torchvision equivalent and are
  refused.
- Any torchvision-style ResNet state dict, bare or under `state_dict`/`model`, with the
  prefixes DDP (`module.`), torch.compile (`_orig_mod.`) and SSL code (`encoder.`,
  `backbone.`, ...) add, or as an `nn.Sequential` of the ResNet's children (`0.weight` is the
  stem, `4.*`-`7.*` the stages), as lightly's examples build it.

The official SimCLR networks were trained on RGB in [0, 1] without mean/std normalisation
(tonylins' evaluation note), so their config records mean 0 and std 1; other checkpoints are
assumed to use torchvision's ImageNet statistics unless the caller says otherwise.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simclr_cli.checkpoint import clean_state_dict, torch_load_error
from simclr_cli.config import IMAGENET_MEAN, IMAGENET_STD
from simclr_cli.errors import CheckpointError
from simclr_cli.models.backbone import Backbone, feature_dim

__all__ = ["ForeignModel", "convert_state", "read_weights_file"]

logger = logging.getLogger(__name__)

_BN_EPS = 1e-5  # TF SimCLR and PyTorch agree on this
_DEPTHS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("bottleneck", (3, 8, 36, 3)): "resnet152",
}
# Where an encoder usually sits in other projects' state dicts, most specific first.
_KNOWN_PREFIXES = ("backbone.resnet.", "", "encoder.", "backbone.", "encoder_q.", "model.")
_SEQUENTIAL_NAMES = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}
_V1_FILE = re.compile(r"resnet50-[124]x\.pth")


@dataclass(frozen=True)
class ForeignModel:
    """Our-format state dict (`backbone.resnet.*`, maybe `projection_head.*`) and config."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]


def read_weights_file(path: Path) -> Any:
    """Tensors from safetensors, or a torch.save file read with weights_only=True only."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: damaged safetensors file ({error})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types; none may reach the user raw
        raise torch_load_error(
            path, error, what="only plain tensor checkpoints or safetensors are accepted"
        ) from None


def convert_state(raw: Any, *, source: str) -> ForeignModel:
    """Map a loaded checkpoint onto our encoder (and head, for SimCLR v2).

    Args:
        raw: What `read_weights_file` returned.
        source: File name or reference, recorded in the config and used in messages.

    Raises:
        CheckpointError: no ResNet encoder found, an unsupported variant, or no key matched.
    """
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(raw).__name__}")
    kind, trunk, head = _unwrap(raw, source=source)
    if kind == "simclr-v2":
        trunk = _rename_v2(trunk, source=source)
    prefix = _find_prefix(trunk, source=source)
    if prefix == "backbone.resnet." and kind == "state-dict":
        # Our own weights without config.json: image size and normalisation are unknown.
        raise CheckpointError(
            f"{source}: simclr-cli weights without a valid simclr-cli config.json beside them "
            "(missing, or not written by simclr); pass the run folder or a folder holding "
            "model.safetensors and its config.json"
        )
    encoder, outside = _strip(trunk, prefix)
    arch, small_stem = _architecture(encoder, source=source)
    matched = _match_reporting(arch, small_stem, encoder, outside=outside, source=source)
    state = {f"backbone.resnet.{k}": v for k, v in matched.items()}
    projection = None
    if kind == "simclr-v2" and head:
        head_state, projection = _fold_v2_head(head, source=source)
        state.update({f"projection_head.{k}": v for k, v in head_state.items()})
    # The official SimCLR nets saw [0, 1] RGB; anything else is assumed torchvision-style.
    unit_range = kind in ("simclr-v1", "simclr-v2")
    size = 32 if small_stem else 224
    config = {
        "arch": arch,
        "small_stem": small_stem,
        "feature_dim": feature_dim(arch),
        "projection": projection,
        "image_size": size,
        "preprocessing": {
            "resize_shorter_side": size,
            "center_crop": size,
            "decode_size": 2 * size,
            "mean": [0.0, 0.0, 0.0] if unit_range else list(IMAGENET_MEAN),
            "std": [1.0, 1.0, 1.0] if unit_range else list(IMAGENET_STD),
        },
        "training": {"source": source, "source_format": kind},
    }
    return ForeignModel(state, config)


def _unwrap(
    raw: Mapping[str, Any], *, source: str
) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(layout kind, encoder-side tensors, v2 head tensors) from the checkpoint's container."""
    if isinstance(raw.get("resnet"), Mapping) and isinstance(raw.get("head"), Mapping):
        return "simclr-v2", _tensors(raw["resnet"]), _tensors(raw["head"])
    for key in ("state_dict", "model", "model_state_dict"):
        inner = raw.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            tensors = clean_state_dict(_tensors(inner))
            is_v1 = key == "state_dict" and _V1_FILE.fullmatch(Path(source).name) is not None
            return ("simclr-v1" if is_v1 else "state-dict"), tensors, {}
    return "state-dict", clean_state_dict(_tensors(raw)), {}


def _tensors(mapping: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {str(k): v for k, v in mapping.items() if isinstance(v, torch.Tensor)}


def _rename_v2(resnet: dict[str, torch.Tensor], *, source: str) -> dict[str, torch.Tensor]:
    """Separius' SimCLR v2 names to torchvision's (`net.1.blocks.0.net.0` -> `layer1.0.conv1`)."""
    if any("mixing_conv" in key or "main_conv" in key for key in resnet):
        raise CheckpointError(
            f"{source}: selective-kernel (sk1) SimCLR v2 networks have no torchvision "
            "equivalent and are not supported; use the _sk0 variant"
        )
    inner = {"0": "conv1", "1.0": "bn1", "2": "conv2", "3.0": "bn2", "4": "conv3", "5.0": "bn3"}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in resnet.items():
        stem = re.fullmatch(r"net\.0\.(0|1\.0)\.(\w+)", key)
        block = re.fullmatch(r"net\.([1-4])\.blocks\.(\d+)\.(.+)\.(\w+)", key)
        if stem:
            renamed[f"{'conv1' if stem.group(1) == '0' else 'bn1'}.{stem.group(2)}"] = value
        elif block:
            stage, index, module, param = block.groups()
            layer = f"layer{stage}.{index}"
            if module.startswith("net.") and module[4:] in inner:
                renamed[f"{layer}.{inner[module[4:]]}.{param}"] = value
            elif module == "projection.shortcut":
                renamed[f"{layer}.downsample.0.{param}"] = value
            elif module == "projection.bn.0":
                renamed[f"{layer}.downsample.1.{param}"] = value
            else:
                renamed[key] = value
        else:
            renamed[key] = value  # fc.* and anything unknown: reported as ignored later
    return renamed


def _find_prefix(state: Mapping[str, torch.Tensor], *, source: str) -> str:
    """The prefix under which a ResNet trunk's keys sit, checked by its structure."""
    candidates = set()
    for key in state:
        for suffix in ("layer1.0.conv1.weight", "4.0.conv1.weight"):
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                stem = "conv1.weight" if suffix.startswith("layer") else "0.weight"
                if f"{prefix}{stem}" in state and (prefix == "" or prefix.endswith(".")):
                    candidates.add(prefix + ("" if suffix.startswith("layer") else "\0"))
    if not candidates:
        sample = ", ".join(sorted(state)[:4]) or "none"
        raise CheckpointError(
            f"{source}: no ResNet encoder weights found ({len(state)} tensors; first keys: "
            f"{sample}); nothing was loaded"
        )
    for known in _KNOWN_PREFIXES:
        for candidate in (known, known + "\0"):
            if candidate in candidates:
                return candidate
    chosen = min(candidates, key=len)
    if len(candidates) > 1:
        logger.warning("%s: several encoders found; using the one under %r", source, chosen)
    return chosen


def _strip(
    state: Mapping[str, torch.Tensor], prefix: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(Keys under `prefix` with torchvision names, keys left outside).

    A trailing NUL on `prefix` marks the nn.Sequential layout, whose child indices are renamed.
    """
    sequential = prefix.endswith("\0")
    prefix = prefix.rstrip("\0")
    out, outside = {}, []
    for key, value in state.items():
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is not None and sequential:
            head, _, tail = rest.partition(".")
            rest = f"{_SEQUENTIAL_NAMES[head]}.{tail}" if head in _SEQUENTIAL_NAMES else None
        if rest is None:
            outside.append(key)
        else:
            out[rest] = value
    return out, outside


def _architecture(encoder: Mapping[str, torch.Tensor], *, source: str) -> tuple[str, bool]:
    """(architecture name, small stem) read from the encoder's names and shapes."""
    block = "bottleneck" if "layer1.0.conv3.weight" in encoder else "basic"
    stage_sizes = tuple(
        len({key.split(".")[1] for key in encoder if key.startswith(f"layer{stage}.")})
        for stage in range(1, 5)
    )
    stem = encoder["conv1.weight"]  # (64 * width, 3, k, k)
    width, remainder = divmod(int(stem.shape[0]), 64)
    if remainder or width < 1 or (width > 1 and block == "basic"):
        raise CheckpointError(f"{source}: stem with {stem.shape[0]} channels is not a ResNet")
    try:
        depth = _DEPTHS[(block, stage_sizes)]
    except KeyError:
        raise CheckpointError(
            f"{source}: a ResNet with {block} blocks {list(stage_sizes)} is not supported"
        ) from None
    return (depth if width == 1 else f"{depth}x{width}"), int(stem.shape[-1]) == 3


def _match_reporting(
    arch: str,
    small_stem: bool,
    encoder: dict[str, torch.Tensor],
    *,
    outside: list[str],
    source: str,
) -> dict[str, torch.Tensor]:
    """The encoder's full state dict, from the checkpoint where it fits.

    Anything missing is left at random initialisation and said so; no match at all, or a
    differing shape, is an error.
    """
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        expected = Backbone(arch, small_stem=small_stem).resnet.state_dict()
    matched = [k for k in encoder if k in expected]
    if not matched:
        raise CheckpointError(f"{source}: none of the checkpoint's keys fit the encoder")
    wrong_shape = [k for k in matched if encoder[k].shape != expected[k].shape]
    if wrong_shape:
        k = wrong_shape[0]
        raise CheckpointError(
            f"{source}: {k} has shape {tuple(encoder[k].shape)}, the encoder expects "
            f"{tuple(expected[k].shape)} ({len(wrong_shape)} such keys)"
        )
    state = {k: encoder[k] for k in matched}
    missing = [k for k in expected if k not in state]
    unexpected = sorted(set(encoder) - set(matched)) + sorted(outside)
    logger.info("%s: loaded %d encoder tensors", source, len(matched))
    if missing:
        logger.warning(
            "%s: %d encoder tensors missing, left at random initialisation: %s",
            source,
            len(missing),
            _sample(missing),
        )
        fresh = Backbone(arch, small_stem=small_stem).resnet.state_dict()
        state.update({k: fresh[k] for k in missing})
    if unexpected:
        # The supervised classifier (`fc.*`) of a torchvision-style net is expected to go.
        only_classifier = all(k.startswith("fc.") for k in unexpected)
        logger.log(
            logging.INFO if only_classifier else logging.WARNING,
            "%s: ignored %d tensors that are not part of the encoder: %s",
            source,
            len(unexpected),
            _sample(unexpected),
        )
    return state


def _sample(keys: list[str]) -> str:
    shown = ", ".join(keys[:6])
    return shown + (f", ... ({len(keys) - 6} more)" if len(keys) > 6 else "")


def _fold_v2_head(
    head: Mapping[str, torch.Tensor], *, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """SimCLR v2's head (3 x Linear-BN, ReLU between) as our ProjectionHead's tensors.

    Our last layer is a Linear with bias and no BN, so the final BN (eval mode) is folded
    into it: y = gamma * (Wx - mean) / sqrt(var + eps) + beta. Inference only: the folded
    head trains differently from the original.
    """
    needed = ("layers.0.weight", "layers.3.weight", "layers.6.weight", "layers.7.running_var")
    if not all(key in head for key in needed):
        raise CheckpointError(f"{source}: the SimCLR v2 head is not the expected 3-layer MLP")
    out = {k: v for k, v in head.items() if k.split(".")[1] in {"0", "1", "3", "4"}}
    scale = head["layers.7.weight"] / torch.sqrt(head["layers.7.running_var"] + _BN_EPS)  # (D,)
    out["layers.6.weight"] = head["layers.6.weight"] * scale[:, None]  # (D, hidden)
    out["layers.6.bias"] = head["layers.7.bias"] - scale * head["layers.7.running_mean"]
    projection = {
        "dim": int(head["layers.6.weight"].shape[0]),
        "layers": 3,
        "hidden_dim": int(head["layers.0.weight"].shape[0]),
    }
    return out, projection
