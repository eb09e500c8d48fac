"""Decoded image batches for training and embedding.

Decoding (and the one resize into a fixed canvas) is the only per-image CPU work; it runs in
DataLoader workers. When every decoded canvas fits in `cache_limit_bytes` they are decoded
once and kept in RAM, so later epochs only index a tensor; larger folders stream from disk
every epoch. Files that cannot be decoded are skipped, named once in the log and counted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from simclr_cli.data.images import DEFAULT_MAX_PIXELS, load_canvas, raise_pillow_pixel_limit
from simclr_cli.errors import DataError, ImageDecodeError

__all__ = [
    "CanvasBatch",
    "ImageBatches",
    "SkipLog",
    "batches_per_epoch",
    "default_num_workers",
    "worker_failure",
]

logger = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 600  # longest wait for one batch from decoding workers


@dataclass
class SkipLog:
    """Files skipped because they could not be decoded; each is logged once."""

    strict: bool = False
    skipped: dict[str, str] = field(default_factory=dict)

    def record(self, path: str, reason: str) -> None:
        """Note a bad file; in strict mode stop instead."""
        if self.strict:
            raise DataError(f"{path}: {reason} (--strict turns skipped images into errors)")
        if path not in self.skipped:
            self.skipped[path] = reason
            logger.warning("skipping %s: %s", path, reason)

    @property
    def count(self) -> int:
        """How many distinct files were skipped."""
        return len(self.skipped)


@dataclass
class CanvasBatch:
    """Decoded images: dataset indices (B,), uint8 canvases (B, 3, C, C), valid sizes (B, 2)."""

    indices: torch.Tensor
    canvases: torch.Tensor
    sizes: torch.Tensor


def default_num_workers() -> int:
    """One worker per spare core, at most 8; none on a single-core machine."""
    return max(0, min(8, usable_cores() - 1))


def cache_fill_workers(requested: int | None) -> int:
    """Decoding workers for filling the in-memory cache, given the user's `--workers`.

    Nothing else runs while the cache fills, so by default it decodes with one worker per
    core (at most 8), not the training loader's spare-core count. A count the user chose is
    kept as given: a lower one may be what fits a small /dev/shm (docker's 64 MB default).
    """
    if requested is not None:
        return requested
    cores = usable_cores()
    return min(8, cores) if cores > 1 else 0


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def batches_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches only; a folder smaller than one batch gives one batch of everything.

    A short last batch has fewer negatives, so its loss is not comparable (and a batch of one
    has none). The order is reshuffled every epoch, so the images left over in one epoch are
    used in others.
    """
    return max(1, num_images // batch_size)


class _CanvasDataset(Dataset[tuple[int, np.ndarray | None, tuple[int, int], str]]):
    def __init__(self, paths: Sequence[Path], canvas_size: int, max_pixels: int) -> None:
        self.paths = paths
        self.canvas_size = canvas_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, tuple[int, int], str]:
        try:
            canvas, size = load_canvas(
                self.paths[index], self.canvas_size, max_pixels=self.max_pixels
            )
        except ImageDecodeError as error:
            return index, None, (0, 0), error.reason
        return index, canvas, size, ""


def _collate(
    items: list[tuple[int, np.ndarray | None, tuple[int, int], str]],
) -> tuple[CanvasBatch, list[tuple[int, str]]]:
    good = [item for item in items if item[1] is not None]
    failures = [(item[0], item[3]) for item in items if item[1] is None]
    if not good:
        empty = CanvasBatch(
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
            torch.zeros(0, 2, dtype=torch.long),
        )
        return empty, failures
    batch = CanvasBatch(
        indices=torch.tensor([item[0] for item in good]),
        canvases=torch.from_numpy(np.stack([item[1] for item in good])),  # type: ignore[misc]
        sizes=torch.tensor([item[2] for item in good]),
    )
    return batch, failures


class ImageBatches:
    """Batches of decoded canvases over a fixed list of image files."""

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        canvas_size: int,
        num_workers: int,
        skip_log: SkipLog,
        max_pixels: int | None = None,
    ) -> None:
        """Prepare to decode `paths`; nothing is read until `cache` or `iterate`.

        Images with more than `max_pixels` pixels (default: Pillow's limit) are skipped as
        possible decompression bombs.
        """
        max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        if max_pixels > DEFAULT_MAX_PIXELS:
            raise_pillow_pixel_limit(max_pixels)  # before workers fork, so they inherit it
        self.paths = list(paths)
        self.canvas_size = canvas_size
        self.num_workers = num_workers
        self.skip_log = skip_log
        self._dataset = _CanvasDataset(self.paths, canvas_size, max_pixels)
        self._cache: CanvasBatch | None = None

    def canvas_bytes(self) -> int:
        """Memory the decoded canvases of every file would take."""
        return len(self.paths) * 3 * self.canvas_size**2

    def cache(self, batch_size: int = 64, *, num_workers: int | None = None) -> None:
        """Decode every image once and keep the canvases in RAM; bad files are dropped.

        Batches arrive in file order, so good canvases are packed at the front of one
        preallocated tensor as they come: peak memory is the cache itself, not twice it.
        `num_workers` overrides the loader's worker count for this pass only (see
        `cache_fill_workers`).
        """
        count, side = len(self.paths), self.canvas_size
        canvases = torch.empty(count, 3, side, side, dtype=torch.uint8)
        sizes = torch.empty(count, 2, dtype=torch.long)
        indices = torch.empty(count, dtype=torch.long)
        filled = 0
        for batch in self._load(list(range(count)), batch_size=batch_size, num_workers=num_workers):
            end = filled + len(batch.indices)
            canvases[filled:end], sizes[filled:end] = batch.canvases, batch.sizes
            indices[filled:end] = batch.indices
            filled = end
        self._cache = CanvasBatch(indices[:filled], canvases[:filled], sizes[:filled])

    @property
    def cached(self) -> bool:
        """Whether every image was decoded into RAM (and bad files are already known)."""
        return self._cache is not None

    @property
    def readable_indices(self) -> torch.Tensor:
        """Indices into `paths` of the images that decoded (all of them before caching)."""
        if self._cache is not None:
            return self._cache.indices
        return torch.arange(len(self.paths))

    def iterate(
        self, order: Sequence[int], *, batch_size: int, keep_empty: bool = False
    ) -> Iterator[CanvasBatch]:
        """Batches of the images at positions `order` of `readable_indices`, in that order.

        A batch whose files all fail to decode is left out, unless `keep_empty`: then every
        `batch_size` positions give exactly one batch, so a training loop can count them.
        """
        if self._cache is not None:
            cache = self._cache
            for start in range(0, len(order), batch_size):
                rows = torch.as_tensor(list(order[start : start + batch_size]), dtype=torch.long)
                yield CanvasBatch(cache.indices[rows], cache.canvases[rows], cache.sizes[rows])
            return
        indices = self.readable_indices
        files = [int(indices[i]) for i in order]
        yield from self._load(files, batch_size=batch_size, keep_empty=keep_empty)

    def _load(
        self,
        file_indices: list[int],
        *,
        batch_size: int,
        keep_empty: bool = False,
        num_workers: int | None = None,
    ) -> Iterator[CanvasBatch]:
        workers = self.num_workers if num_workers is None else num_workers
        batches = [
            file_indices[i : i + batch_size] for i in range(0, len(file_indices), batch_size)
        ]
        loader = DataLoader(
            self._dataset,
            batch_sampler=batches,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=False,
            # A worker stuck on a file (a stalled network mount, say) must not hang the run.
            timeout=WORKER_TIMEOUT_S if workers else 0,
        )
        try:
            for batch, failures in loader:
                for index, reason in failures:
                    self.skip_log.record(str(self.paths[index]), reason)
                if len(batch.indices) or keep_empty:
                    yield batch
        except RuntimeError as error:
            if "timed out" in str(error):
                raise DataError(
                    f"no decoded batch arrived for {WORKER_TIMEOUT_S} s; a file may sit on a "
                    "stalled network drive or be pathologically slow to decode. Retry with "
                    "--workers 0 to see which file it is"
                ) from None
            failure = worker_failure(error)
            if failure is not None:
                raise failure from None
            raise


def worker_failure(error: BaseException) -> DataError | None:
    """The actionable error for a dead decoding worker or exhausted shared memory, else None.

    torch reports a worker killed by a signal (the OOM killer, say) from its SIGCHLD handler,
    so the RuntimeError can surface anywhere in the main process, a training step included,
    not only where batches are fetched: the command line converts it as well.
    """
    text = str(error)
    if not isinstance(error, RuntimeError):
        return None
    if "DataLoader worker" not in text and "shared memory" not in text.lower():
        return None
    first_line = text.splitlines()[0].strip() if text.strip() else type(error).__name__
    return DataError(
        f"an image-decoding worker failed ({first_line}); retry with --workers 0, or give "
        "the container more memory and shared memory (docker run --shm-size=2g)"
    )
