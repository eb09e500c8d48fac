"""Frozen-encoder features for a folder of images, written as a `.npy` plus a manifest.

The manifest (`<name>.manifest.csv`, beside the array) has one line per image file found:
its row in the array, or an empty row and the reason it was skipped. `<name>.json` records
the model, the feature kind and the counts.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simclr_cli.checkpoint import atomic_write
from simclr_cli.data.augment import center_view
from simclr_cli.data.images import scan_images
from simclr_cli.data.loader import ImageBatches, SkipLog, default_num_workers
from simclr_cli.device import Precision, autocast, resolve_device, resolve_precision
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.errors import ConfigError, DataError, format_bytes, os_error_reason
from simclr_cli.models.backbone import folded_for_inference
from simclr_cli.models.export import LoadedModel, load_model, state_fingerprint

__all__ = ["EmbedOptions", "EmbedResult", "embed_folder", "encode", "iter_encoded"]

_PROGRESS_SECONDS = 10.0  # how often an embedding records how far it got


@dataclass(frozen=True)
class EmbedResult:
    """Where the vectors went and how many images they cover."""

    array_path: Path
    manifest_path: Path
    rows: int
    dim: int
    skipped: dict[str, str]
    seconds: float


@torch.no_grad()
def iter_encoded(
    model: LoadedModel,
    data: ImageBatches,
    *,
    device: torch.device,
    precision: Precision,
    batch_size: int = 256,
    projection: bool = False,
    start: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch: (float32 rows (b, D) on the CPU, indices of their files in `data.paths`).

    `start` skips the first readable images (a resumed embedding).
    """
    if projection and model.projection_head is None:
        raise ConfigError("this model has no projection head; embed its features instead")
    preprocessing = model.config["preprocessing"]
    mean = torch.tensor(preprocessing["mean"], device=device)[None, :, None, None]
    std = torch.tensor(preprocessing["std"], device=device)[None, :, None, None]
    backbone = folded_for_inference(model.backbone).to(device)
    head = model.projection_head.to(device).eval() if projection and model.projection_head else None
    total = len(data.readable_indices)
    for batch in data.iterate(range(start, total), batch_size=batch_size):
        images = center_view(batch.canvases.to(device), batch.sizes, size=model.image_size)
        images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            out = backbone(images)  # (b, feature_dim)
            if head is not None:
                out = head(out)  # (b, projection_dim)
        yield out.float().cpu(), batch.indices


def encode(
    model: LoadedModel,
    data: ImageBatches,
    *,
    device: torch.device,
    precision: Precision,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of every readable image, (N, D), and the indices of their files."""
    parts = list(
        iter_encoded(model, data, device=device, precision=precision, batch_size=batch_size)
    )
    if not parts:
        return torch.zeros(0, model.backbone.feature_dim), torch.zeros(0, dtype=torch.long)
    return torch.cat([rows for rows, _ in parts]), torch.cat([index for _, index in parts])


@dataclass(frozen=True)
class EmbedOptions:
    """How `embed_folder` runs and what it writes."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    num_workers: int | None = None
    projection: bool = False
    l2_normalize: bool = False
    strict: bool = False
    max_pixels: int | None = None  # None: Pillow's decompression-bomb limit


def embed_folder(
    data_dir: Path,
    model_path: Path | str,
    out_path: Path,
    *,
    options: EmbedOptions | None = None,
    reporter: Reporter | None = None,
) -> EmbedResult:
    """Embed every image under `data_dir` with the model at `model_path` into `out_path`.

    `model_path` is anything `--model` accepts: a run or model folder, a weights file, or a
    Hub repository id.
    """
    options = options or EmbedOptions()
    reporter = reporter or NullReporter()
    started = time.monotonic()
    if out_path.suffix != ".npy":
        raise ConfigError(f"{out_path}: the output must be a .npy file")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    model = load_model(model_path)
    # Only the tool's own run folders are left out; embed outputs are not images anyway.
    paths = scan_images(data_dir)
    if not paths:
        raise DataError(f"{data_dir}: no images found (looked for common image extensions)")
    skip_log = SkipLog(strict=options.strict)
    workers = options.num_workers if options.num_workers is not None else default_num_workers()
    data = ImageBatches(
        paths,
        canvas_size=int(model.config["preprocessing"]["decode_size"]),
        num_workers=workers,
        skip_log=skip_log,
        max_pixels=options.max_pixels,
    )
    _check_writable(out_path)
    identity = _identity(model, paths, options)
    try:
        rows_written, dim, finished = _write_rows(
            model,
            data,
            out_path,
            options=options,
            identity=identity,
            device=device,
            precision=precision,
            reporter=reporter,
        )
    except OSError as error:
        reason = os_error_reason(error)
        raise ConfigError(f"could not write the embeddings to {out_path}: {reason}") from None
    manifest = out_path.with_suffix(".manifest.csv")
    meta = out_path.with_suffix(".json")
    staged_manifest = manifest.with_name(f".{manifest.name}.tmp")
    staged_meta = meta.with_name(f".{meta.name}.tmp")
    try:
        _write_manifest(staged_manifest, paths, rows_written, skip_log)
        _write_meta(
            staged_meta,
            out_path=out_path,
            model_path=model_path,
            data_dir=data_dir,
            options=options,
            rows=len(rows_written),
            dim=dim,
            skipped=skip_log.count,
            weights_sha256=identity["weights_sha256"],
            device=device,
            precision=precision,
        )
    except OSError as error:
        staged_manifest.unlink(missing_ok=True)
        staged_meta.unlink(missing_ok=True)
        raise ConfigError(
            f"could not write the manifest of {out_path}: {os_error_reason(error)}; nothing "
            "was replaced. Free some space and run the same command again"
        ) from None
    # All three files are complete: publish them together (renames need no free space), so
    # an index is never left with an array but no manifest.
    finished.replace(out_path)
    staged_manifest.replace(manifest)
    staged_meta.replace(meta)
    out_path.with_name(f".{out_path.name}.progress.json").unlink(missing_ok=True)
    return EmbedResult(
        out_path,
        manifest,
        len(rows_written),
        dim,
        dict(skip_log.skipped),
        time.monotonic() - started,
    )


def _identity(model: LoadedModel, paths: Sequence[Path], options: EmbedOptions) -> dict[str, Any]:
    """What the rows depend on: exact weights, the files (path, size, time), the output kind."""
    files = hashlib.sha256()
    for path in paths:
        try:
            stat = path.stat()
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            stamp = "unreadable"
        files.update(str(path).encode("utf-8", "surrogateescape") + b"\0" + stamp.encode())
    weights = state_fingerprint(model.backbone)
    if options.projection and model.projection_head is not None:
        weights += "+" + state_fingerprint(model.projection_head)
    return {
        "progress_format": 1,
        "weights_sha256": weights,
        "files_sha256": files.hexdigest(),
        "files": len(paths),
        "projection": options.projection,
        "l2_normalize": options.l2_normalize,
    }


def _check_writable(out_path: Path) -> None:
    """Fail before any work if the output folder cannot be created or written."""
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        probe = out_path.with_name(f".{out_path.name}.write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = os_error_reason(error)
        raise ConfigError(f"cannot write {out_path}: {reason}") from None


def _write_rows(
    model: LoadedModel,
    data: ImageBatches,
    out_path: Path,
    *,
    options: EmbedOptions,
    identity: dict[str, Any],
    device: torch.device,
    precision: Precision,
    reporter: Reporter,
) -> tuple[list[int], int, Path]:
    """Stream rows into a hidden memory-mapped .npy: (file index of each row, width, its path).

    The caller publishes the finished file under `out_path` once the manifest is written too.

    Rows follow the files in order, so progress is "files done" plus the files skipped so far.
    Both go into a small JSON beside the partial array every few seconds, after the array is
    flushed; a run stopped at any moment (Ctrl-C, kill, power loss) restarts from its last
    record when the same command is run again, and never mixes rows of another model, folder
    or option set (the record names all three).
    """
    dim = model.backbone.feature_dim
    if options.projection and model.projection_head is not None:
        dim = int(model.config["projection"]["dim"])
    tmp = out_path.with_name(f".{out_path.name}.partial.npy")
    progress_path = out_path.with_name(f".{out_path.name}.progress.json")
    total = len(data.paths)
    start_file, rows_done = _resumable_position(tmp, progress_path, identity, data, reporter)
    try:
        if start_file == 0:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        else:
            array = np.lib.format.open_memmap(tmp, mode="r+")
        _reserve_disk_space(tmp, zero_fill_from=array.offset if start_file == 0 else None)
    except OSError as error:
        if start_file == 0:
            tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write {out_path}: {os_error_reason(error)} (the rows need "
            f"{format_bytes(total * dim * 4)}); free some space or choose another -o"
        ) from None
    skipped_before = set(data.skip_log.skipped)
    file_indices = [i for i in range(start_file) if str(data.paths[i]) not in skipped_before]
    if len(file_indices) != rows_done:
        raise DataError(f"{progress_path}: inconsistent progress record; delete it to start over")

    def save_progress(files_done: int) -> None:
        array.flush()  # rows first: a record never claims rows that are not on disk
        record = {**identity, "files_done": files_done, "rows": len(file_indices)}
        record["skipped"] = dict(data.skip_log.skipped)
        text = json.dumps(record)
        atomic_write(progress_path, lambda tmp_file: tmp_file.write_text(text, encoding="utf-8"))

    reporter.start(task="embed", total=total, unit="image", completed=start_file)
    files_done, last_save = start_file, time.monotonic()
    try:
        for rows, indices in iter_encoded(
            model,
            data,
            device=device,
            precision=precision,
            batch_size=options.batch_size,
            projection=options.projection,
            start=start_file,
        ):
            if options.l2_normalize:
                rows = F.normalize(rows, dim=1)
            array[len(file_indices) : len(file_indices) + len(rows)] = rows.numpy()
            file_indices.extend(indices.tolist())
            # Files before the last row's file are settled, read or skipped.
            files_done = int(indices[-1]) + 1
            reporter.advance(completed=files_done, metrics={})
            if time.monotonic() - last_save > _PROGRESS_SECONDS:
                save_progress(files_done)
                last_save = time.monotonic()
    except BaseException:
        # Ctrl-C or a failure: keep what is done, so running the command again continues.
        if files_done > start_file:
            save_progress(files_done)
        raise
    finally:
        reporter.stop()
    array.flush()
    count = len(file_indices)
    if count == 0:
        del array
        tmp.unlink(missing_ok=True)
        progress_path.unlink(missing_ok=True)
        raise DataError(f"none of the {total} image files could be read")
    if count < total:
        # Skipped files left unused rows at the end; copy the used ones into an exact-size file.
        exact = out_path.with_name(f".{out_path.name}.exact.npy")
        try:
            final = np.lib.format.open_memmap(
                exact, mode="w+", dtype=np.float32, shape=(count, dim)
            )
            _reserve_disk_space(exact, zero_fill_from=final.offset)
        except OSError as error:
            exact.unlink(missing_ok=True)
            save_progress(files_done)
            raise ConfigError(
                f"cannot write {out_path}: {os_error_reason(error)}; the rows so far are kept, "
                "free some space and run the same command again"
            ) from None
        for begin in range(0, count, 65536):
            stop = min(begin + 65536, count)
            final[begin:stop] = array[begin:stop]
        final.flush()
        del final
        del array
        tmp.unlink()
        tmp = exact
    else:
        del array
    return file_indices, dim, tmp


def _reserve_disk_space(path: Path, *, zero_fill_from: int | None) -> None:
    """Give the memory-mapped array file its disk blocks now, not page by page later.

    numpy creates the file sparse. On a disk that fills up later, a write through the map
    has no way to report ENOSPC and the kernel kills the process with SIGBUS; reserving
    the whole size up front turns that into an error before any work. posix_fallocate does
    it at once where it exists; elsewhere (macOS, Windows, filesystems that refuse it) a
    new file's data region is written with zeros instead, which costs one sequential
    write of the array (about a second per GB). A resumed file was reserved when it was
    made, so `zero_fill_from` is None for it and nothing is rewritten.
    """
    with path.open("r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        allocate = getattr(os, "posix_fallocate", None)
        if allocate is not None:
            try:
                allocate(handle.fileno(), 0, size)
                return
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        if zero_fill_from is None:
            return
        handle.seek(zero_fill_from)
        chunk = bytes(16 * 2**20)
        for start in range(zero_fill_from, size, len(chunk)):
            handle.write(chunk[: min(len(chunk), size - start)])
        handle.flush()
        os.fsync(handle.fileno())


def _resumable_position(
    partial: Path,
    progress_path: Path,
    identity: dict[str, Any],
    data: ImageBatches,
    reporter: Reporter,
) -> tuple[int, int]:
    """(files done, rows done) of an earlier, matching run of this command; (0, 0) otherwise."""
    if not (partial.is_file() and progress_path.is_file()):
        return 0, 0
    try:
        record = json.loads(progress_path.read_text(encoding="utf-8"))
        same = all(record.get(key) == value for key, value in identity.items())
        files_done, rows = int(record["files_done"]), int(record["rows"])
        skipped = {str(k): str(v) for k, v in record.get("skipped", {}).items()}
        shape = np.load(partial, mmap_mode="r").shape
    except (OSError, ValueError, KeyError, TypeError):
        same, files_done, rows, skipped, shape = False, 0, 0, {}, (0, 0)
    if not same or shape[0] != len(data.paths) or not 0 < files_done <= len(data.paths):
        reporter.message("an unfinished embedding of other inputs was found; starting over")
        return 0, 0
    for path, reason in skipped.items():
        data.skip_log.skipped.setdefault(path, reason)
    reporter.message(
        f"continuing an unfinished embedding: {files_done} of {len(data.paths)} files were done"
    )
    return files_done, rows


def _write_manifest(
    manifest: Path, paths: Sequence[Path], file_indices: list[int], skip_log: SkipLog
) -> None:
    """CSV with one line per image file: row (empty when skipped), path, skip reason."""
    row_of = {index: row for row, index in enumerate(file_indices)}
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "skipped_reason"])
        for index, path in enumerate(paths):
            row = row_of.get(index)
            reason = "" if row is not None else skip_log.skipped.get(str(path), "not read")
            writer.writerow(["" if row is None else row, str(path), reason])


def _write_meta(
    meta_path: Path,
    *,
    out_path: Path,
    model_path: Path | str,
    data_dir: Path,
    options: EmbedOptions,
    rows: int,
    dim: int,
    skipped: int,
    weights_sha256: str,
    device: torch.device,
    precision: Precision,
) -> None:
    meta = {
        "array": out_path.name,
        "manifest": out_path.with_suffix(".manifest.csv").name,
        "model": _describe_model(model_path),
        # neighbors checks a model it loads to embed queries against this.
        "weights_sha256": weights_sha256,
        "data_dir": os.path.abspath(data_dir),
        "output": "projection" if options.projection else "features",
        "l2_normalized": options.l2_normalize,
        # What `auto` resolved to: rows embedded in bf16 differ slightly from fp32 ones.
        "device": str(device),
        "precision": precision.name,
        "rows": rows,
        "dim": dim,
        "skipped": skipped,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _describe_model(model_path: Path | str) -> str:
    """An absolute path for local models; the reference as given for Hub repositories."""
    local = Path(model_path).expanduser()
    return os.path.abspath(local) if local.exists() else str(model_path)
