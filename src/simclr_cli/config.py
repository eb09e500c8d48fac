"""Frozen, validated configuration for every part of a run.

One dataclass per concern. Configs are never mutated; values derived from several fields
(the scaled learning rate, whether blur is on, the small-image stem) come from the named
functions at the bottom of this module, so a saved config always rebuilds the same run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from simclr_cli.errors import ConfigError

__all__ = [
    "ARCHITECTURES",
    "AugmentConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "blur_probability",
    "build_run_config",
    "decode_size",
    "resolved_lr",
    "resolved_weight_decay",
    "uses_small_stem",
    "warmup_steps",
]

# ImageNet channel statistics, the usual normalisation for torchvision ResNets.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")
SMALL_IMAGE_LIMIT = 64  # the paper's CIFAR-10 choices (no blur, 3x3 stem) below this side


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class AugmentConfig:
    """The SimCLR view pipeline (paper, appendix A), one instance applied to each view."""

    image_size: int = 224
    crop_area: tuple[float, float] = (0.08, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter_strength: float = 1.0  # the paper's s: brightness/contrast/saturation 0.8s, hue 0.2s
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float | None = None  # None: 0.5 above 64 px, off at or below (as for CIFAR-10)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        """Reject values the pipeline cannot honour."""
        # Messages name the command-line option where there is one (pretrain and
        # augment-preview share these flags); the rest only come from an edited config.
        _check(
            8 <= self.image_size <= 1024,
            f"--image-size must be between 8 and 1024 pixels, got {self.image_size}",
        )
        low, high = self.crop_area
        if high == 1:  # the command line sets only the minimum
            _check(0 < low <= 1, f"--crop-min-area must be in (0, 1], got {low:g}")
        _check(
            0 < low <= high <= 1,
            f"crop area must satisfy 0 < min <= max <= 1, got {low:g} to {high:g}",
        )
        _check(0 < self.crop_aspect[0] <= self.crop_aspect[1], "crop aspect must be min <= max")
        for words, value in (
            ("--flip-prob", self.flip_prob),
            ("the colour jitter probability", self.jitter_prob),
            ("the grayscale probability", self.grayscale_prob),
        ):
            _check(0 <= value <= 1, f"{words} must be a probability in [0, 1], got {value:g}")
        _check(
            self.blur_prob is None or 0 <= self.blur_prob <= 1,
            f"--blur-prob must be a probability in [0, 1], got {self.blur_prob}",
        )
        _check(
            0 <= self.jitter_strength <= 2.5,
            f"--jitter-strength must be in [0, 2.5], got {self.jitter_strength:g}",
        )
        _check(0 < self.blur_sigma[0] <= self.blur_sigma[1], "blur sigma must be 0 < min <= max")
        _check(all(s > 0 for s in self.std), "normalisation std must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder (a torchvision ResNet without its classifier) and projection head."""

    arch: str = "resnet18"
    small_stem: bool | None = None  # None: chosen from the image size (3x3 stem at <= 64 px)
    projection_dim: int = 128
    projection_layers: int = 2
    projection_hidden_dim: int | None = None  # None: the encoder's feature size

    def __post_init__(self) -> None:
        """Reject unknown architectures and impossible head sizes."""
        _check(
            self.arch in ARCHITECTURES,
            f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}",
        )
        _check(self.projection_dim >= 1, "--projection-dim must be at least 1")
        _check(self.projection_layers in (2, 3), "--projection-layers must be 2 or 3")
        _check(
            self.projection_hidden_dim is None or self.projection_hidden_dim >= 1,
            "projection hidden dim must be at least 1",
        )


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warmup, then cosine decay per step)."""

    optimizer: str = "lars"
    base_lr: float | None = None  # None: 0.3 for LARS/SGD (paper), 1e-3 for AdamW
    lr_scaling: str = "linear"  # lr = base_lr * B/256 ("linear") or base_lr * sqrt(B) ("sqrt")
    weight_decay: float | None = None  # None: 1e-6 for LARS/SGD (paper), 1e-4 for AdamW
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    lars_trust_coefficient: float = 0.001

    def __post_init__(self) -> None:
        """Reject unknown optimisers and negative rates."""
        _check(
            self.optimizer in OPTIMIZERS,
            f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}",
        )
        _check(
            self.lr_scaling in LR_SCALINGS,
            f"unknown --lr-scaling {self.lr_scaling!r}; use linear, sqrt or none",
        )
        _check(self.base_lr is None or self.base_lr > 0, "--lr must be positive")
        _check(self.weight_decay is None or self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(0 <= self.momentum < 1, "momentum must be in [0, 1)")
        _check(self.warmup_epochs >= 0, "--warmup-epochs must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """What to train on, for how long, where, and how to report."""

    data_dir: str = ""
    out_dir: str = ""
    epochs: int = 100
    global_batch_size: int = 256
    temperature: float = 0.5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int | None = None  # None: chosen from the CPU count
    cache_limit_gb: float = 4.0  # decoded images are kept in RAM when they fit in this much
    checkpoint_minutes: float = 10.0
    strict: bool = False
    max_pixels: int | None = None  # None: Pillow's decompression-bomb limit (about 179 MP)
    # Several processes (torchrun): batch norm over the global batch, as the paper's global
    # BN; per-process statistics let the model find positives by their shared statistics.
    sync_batchnorm: bool = True
    dist_backend: str = "auto"  # auto: NCCL on CUDA, gloo otherwise
    chunk_size: int | None = None  # gradient caching: encode this many images at a time
    # Encoder BN: "batch" statistics (per chunk with chunk_size), or "frozen" running ones,
    # under which chunked gradients equal full-batch ones exactly (docs/distributed.md).
    encoder_batchnorm: str = "batch"
    # Start from these weights instead of a random init: a run, model folder, weights file or
    # Hub repository (anything `--model` takes). The projection head is copied too when its
    # shape matches, else it starts fresh.
    init: str | None = None

    def __post_init__(self) -> None:
        """Reject values that would make the run meaningless."""
        _check(self.epochs >= 1, "--epochs must be at least 1")
        _check(
            self.global_batch_size >= 2,
            "--batch-size must be at least 2: NT-Xent needs another image as a negative",
        )
        _check(self.temperature > 0, f"--temperature must be positive, got {self.temperature:g}")
        _check(self.num_workers is None or self.num_workers >= 0, "--workers must be >= 0")
        _check(self.cache_limit_gb >= 0, "--cache-limit-gb must be >= 0")
        _check(self.checkpoint_minutes > 0, "--checkpoint-minutes must be positive")
        _check(self.max_pixels is None or self.max_pixels >= 1, "--max-pixels must be positive")
        _check(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            f"unknown precision {self.precision!r}; use auto, fp32, bf16 or fp16",
        )
        _check(
            self.dist_backend in ("auto", "nccl", "gloo"),
            f"unknown distributed backend {self.dist_backend!r}; use auto, nccl or gloo",
        )
        _check(self.chunk_size is None or self.chunk_size >= 1, "--chunk-size must be at least 1")
        _check(
            self.encoder_batchnorm in ("batch", "frozen"),
            f"unknown encoder batch-norm mode {self.encoder_batchnorm!r}; use batch or frozen",
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a pretraining run; saved to the run folder and checkpoints."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Rebuild and re-validate a config saved by `to_dict`; unknown keys are errors."""
        part_types = {
            "augment": AugmentConfig,
            "model": ModelConfig,
            "optim": OptimConfig,
            "train": TrainConfig,
        }
        parts = {
            name: _from_plain(part_type, data.get(name, {}))
            for name, part_type in part_types.items()
        }
        return cls(**parts)


def _from_plain(cls: type[Any], data: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys in saved config: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def build_run_config(
    *,
    augment: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    optim: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> RunConfig:
    """A validated RunConfig from per-part settings; unset fields keep their defaults."""
    return RunConfig.from_dict(
        {"augment": augment or {}, "model": model or {}, "optim": optim or {}, "train": train or {}}
    )


def blur_probability(augment: AugmentConfig) -> float:
    """Gaussian blur probability: 0.5 above 64 px, 0 at or below unless set explicitly."""
    if augment.blur_prob is not None:
        return augment.blur_prob
    return 0.5 if augment.image_size > SMALL_IMAGE_LIMIT else 0.0


def uses_small_stem(model: ModelConfig, image_size: int) -> bool:
    """3x3 stride-1 first convolution without max-pool, for images of 64 px or less."""
    if model.small_stem is not None:
        return model.small_stem
    return image_size <= SMALL_IMAGE_LIMIT


def decode_size(augment: AugmentConfig) -> int:
    """Side of the square canvas each image is decoded into before cropping.

    Twice the training size keeps a 0.08-area crop close to native resolution while
    bounding memory; images are never upscaled beyond what the crop needs.
    """
    return 2 * augment.image_size


def resolved_lr(optim: OptimConfig, global_batch_size: int) -> float:
    """Peak learning rate after batch-size scaling (paper, appendix B.1)."""
    base = optim.base_lr if optim.base_lr is not None else _default_base_lr(optim)
    if optim.lr_scaling == "linear":
        return base * global_batch_size / 256
    if optim.lr_scaling == "sqrt":
        return base * math.sqrt(global_batch_size)
    return base


def _default_base_lr(optim: OptimConfig) -> float:
    if optim.optimizer == "adamw":
        return 1e-3
    # The paper's sqrt rule uses 0.075 as its base; the linear rule uses 0.3.
    return 0.075 if optim.lr_scaling == "sqrt" else 0.3


def resolved_weight_decay(optim: OptimConfig) -> float:
    """Weight decay, with the paper's 1e-6 for LARS/SGD when unset."""
    if optim.weight_decay is not None:
        return optim.weight_decay
    return 1e-4 if optim.optimizer == "adamw" else 1e-6


def warmup_steps(optim: OptimConfig, *, epochs: int, steps_per_epoch: int) -> int:
    """Warmup length in steps, never more than a tenth of the run."""
    warmup_epochs = min(optim.warmup_epochs, 0.1 * epochs)
    return round(warmup_epochs * steps_per_epoch)
