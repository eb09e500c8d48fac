"""Frozen features of labelled images, computed once and cached on disk.

`simclr eval` is usually run several times over the same folders with other k, baselines or
probe settings; encoding is the slow part, so features are cached under a key made of
everything they depend on: the encoder's exact weights (including batch-norm statistics),
its preprocessing, and each file's path, size and modification time. Any change to one of
those misses the cache; nothing stale can be returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from simclr_cli.checkpoint import atomic_write, save_safetensors
from simclr_cli.data.augment import center_view
from simclr_cli.data.labeled import LabeledImages
from simclr_cli.data.loader import ImageBatches, SkipLog, default_num_workers
from simclr_cli.device import Precision
from simclr_cli.engine.embed import iter_encoded
from simclr_cli.errors import DataError, os_error_reason
from simclr_cli.models.export import LoadedModel, state_fingerprint

__all__ = [
    "FeatureSet",
    "PIXEL_BASELINE_SIZE",
    "default_cache_dir",
    "labeled_features",
]

logger = logging.getLogger(__name__)

# Raw-pixel baseline resolution cap: 32x32x3 = 3,072 numbers per image keeps kNN and the
# probe cheap, and is the usual size for this baseline on small-image benchmarks.
PIXEL_BASELINE_SIZE = 32


@dataclass(frozen=True)
class FeatureSet:
    """Features of the readable images of one labelled split."""

    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,) class indices
    paths: list[Path]  # file of each row
    skipped: dict[str, str]  # unreadable file -> reason
    from_cache: bool


def default_cache_dir() -> Path:
    """$SIMCLR_CACHE_DIR, else the platform's user cache folder (e.g. ~/.cache/simclr-cli)."""
    override = os.environ.get("SIMCLR_CACHE_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("simclr-cli", appauthor=False))


def labeled_features(
    images: LabeledImages,
    *,
    model: LoadedModel | None,
    kind: str,
    device: torch.device,
    precision: Precision,
    batch_size: int = 256,
    num_workers: int | None = None,
    max_pixels: int | None = None,
    strict: bool = False,
    cache_dir: Path | None = None,
    model_fingerprint: str | None = None,
) -> FeatureSet:
    """Features of every readable image in `images`, from the cache when possible.

    Args:
        images: The labelled split.
        model: The encoder (also gives the preprocessing for the pixel baseline).
        kind: "encoder" for the model's features, "pixels" for the raw-pixel baseline: the
            same centre view at no more than PIXEL_BASELINE_SIZE px, flattened.
        device: Where to compute.
        precision: Autocast precision for the encoder.
        batch_size: Images per forward pass.
        num_workers: Decoding processes (default: spare cores).
        max_pixels: Decompression-bomb limit, as for the other commands.
        strict: Stop at the first unreadable image.
        cache_dir: Where cached features live; None disables the cache.
        model_fingerprint: `state_fingerprint` of the encoder, if the caller already has it.
    """
    if model is None:
        raise ValueError("labeled_features needs a model for its preprocessing")
    if kind not in ("encoder", "pixels"):
        raise ValueError(f"unknown feature kind {kind!r}")
    preprocessing = model.config["preprocessing"]
    if kind == "encoder":
        fingerprint = model_fingerprint or state_fingerprint(model.backbone)
    else:
        fingerprint = f"pixels-{min(model.image_size, PIXEL_BASELINE_SIZE)}"
    key = _cache_key(images, fingerprint=fingerprint, preprocessing=preprocessing)
    cache_path = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    cached = _read_cache(cache_path, images) if cache_path is not None else None
    if cached is not None:
        return cached

    skip_log = SkipLog(strict=strict)
    data = ImageBatches(
        images.paths,
        canvas_size=int(preprocessing["decode_size"]),
        num_workers=num_workers if num_workers is not None else default_num_workers(),
        skip_log=skip_log,
        max_pixels=max_pixels,
    )
    if kind == "encoder":
        parts = list(
            iter_encoded(model, data, device=device, precision=precision, batch_size=batch_size)
        )
    else:
        parts = list(_pixel_rows(data, model, device=device, batch_size=batch_size))
    if not parts:
        raise DataError(f"none of the {len(images.paths)} labelled images could be read")
    features = torch.cat([rows for rows, _ in parts])
    file_indices = torch.cat([index for _, index in parts])
    result = FeatureSet(
        features=features,
        labels=torch.tensor(images.labels, dtype=torch.long)[file_indices],
        paths=[images.paths[i] for i in file_indices.tolist()],
        skipped=dict(skip_log.skipped),
        from_cache=False,
    )
    if cache_path is not None:
        _write_cache(cache_path, features, file_indices, skip_log.skipped)
    return result


@torch.no_grad()
def _pixel_rows(
    data: ImageBatches, model: LoadedModel, *, device: torch.device, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw-pixel features: the evaluation view, normalised as the encoder's input, flattened."""
    preprocessing = model.config["preprocessing"]
    size = min(model.image_size, PIXEL_BASELINE_SIZE)
    mean = torch.tensor(preprocessing["mean"], device=device)[None, :, None, None]
    std = torch.tensor(preprocessing["std"], device=device)[None, :, None, None]
    rows = []
    for batch in data.iterate(range(len(data.readable_indices)), batch_size=batch_size):
        view = center_view(batch.canvases.to(device), batch.sizes, size=size)  # (b, 3, s, s)
        rows.append((((view - mean) / std).flatten(1).float().cpu(), batch.indices))
    return rows


def _cache_key(images: LabeledImages, *, fingerprint: str, preprocessing: dict[str, object]) -> str:
    digest = hashlib.sha256()
    digest.update(fingerprint.encode())
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    for path in images.paths:
        try:
            stat = path.stat()
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "unreadable"
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0" + stamp.encode())
    return digest.hexdigest()[:40]


def _read_cache(path: Path, images: LabeledImages) -> FeatureSet | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            skipped = json.loads((handle.metadata() or {}).get("skipped", "{}"))
            features = handle.get_tensor("features")
            file_indices = handle.get_tensor("file_indices")
        if file_indices.numel() and int(file_indices.max()) >= len(images.paths):
            raise ValueError("row index out of range")
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        # A damaged cache entry costs one re-encode, never a wrong answer.
        logger.warning("ignoring the unreadable feature cache %s (%s)", path, error)
        return None
    logger.info("features read from the cache %s", path)
    return FeatureSet(
        features=features,
        labels=torch.tensor(images.labels, dtype=torch.long)[file_indices],
        paths=[images.paths[i] for i in file_indices.tolist()],
        skipped=skipped,
        from_cache=True,
    )


def _write_cache(
    path: Path, features: torch.Tensor, file_indices: torch.Tensor, skipped: dict[str, str]
) -> None:
    tensors = {"features": features.contiguous(), "file_indices": file_indices.contiguous()}
    metadata = {"skipped": json.dumps(skipped)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))
    except OSError as error:
        # The cache only saves time; evaluation goes on without it.
        logger.warning("could not write the feature cache %s (%s)", path, os_error_reason(error))
