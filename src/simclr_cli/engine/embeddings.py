"""Reading back what `simclr embed` wrote: the vectors, the files they belong to, the model.

`load_embeddings("vecs.npy")` memory-maps the array (rows are read when used, so an index of a
million rows costs no RAM up front), reads `vecs.manifest.csv` to map rows to files, and
`vecs.json` for the model that made them. A manifest that does not describe the array is an
error, never a silent misalignment of rows and files.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from simclr_cli.data.loader import ImageBatches, SkipLog
from simclr_cli.device import resolve_device, resolve_precision
from simclr_cli.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    from simclr_cli.models.export import LoadedModel

__all__ = ["Embeddings", "QuerySkips", "embed_images", "load_embeddings"]


@dataclass
class Embeddings:
    """Vectors (N, D) from `simclr embed`, the file of each row, and the run's metadata."""

    array_path: Path
    vectors: npt.NDArray[np.float32]  # memory-mapped, read-only
    paths: list[Path]  # paths[row] is the image of vectors[row]
    meta: dict[str, Any]
    _row_of: dict[str, int] | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        """Number of vectors."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Width of each vector."""
        return int(self.vectors.shape[1])

    def file_status(self, row: int) -> str | None:
        """Why a row's file may not be what its vector describes ("missing/changed since embed").

        An index outlives its files; commands that list or draw a row say so rather than
        present a deleted or replaced file as what the vector describes.
        """
        try:
            modified = self.paths[row].stat().st_mtime
        except OSError:
            return "missing since embed"
        try:
            written = self.array_path.stat().st_mtime
        except OSError:
            return None
        return "changed since embed" if modified > written else None

    def row_of(self, path: Path) -> int | None:
        """The row of an image file in this index, or None when it was not embedded."""
        if self._row_of is None:
            self._row_of = {os.path.normcase(str(p)): row for row, p in enumerate(self.paths)}
        row = self._row_of.get(os.path.normcase(str(path.absolute())))
        if row is None:
            # Same file reached through a link or a relative path: compare resolved paths,
            # built only on this slower fallback.
            resolved = {os.path.realpath(p): r for r, p in enumerate(self.paths)}
            row = resolved.get(os.path.realpath(path))
        return row


def load_embeddings(array_path: Path) -> Embeddings:
    """Open `<name>.npy` with its `<name>.manifest.csv` and `<name>.json` (both required).

    Raises:
        DataError: The array or manifest is missing or unreadable, or they do not match.
    """
    if array_path.suffix != ".npy":
        raise ConfigError(f"{array_path}: --index takes the .npy file that simclr embed wrote")
    if not array_path.is_file():
        raise DataError(f"{array_path}: no such file; create it with simclr embed DIR -o FILE.npy")
    try:
        vectors = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise DataError(f"{array_path}: not a readable .npy array ({error})") from None
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating):
        raise DataError(
            f"{array_path}: expected a non-empty 2-D float array, got shape {vectors.shape} "
            f"of {vectors.dtype}"
        )
    manifest = array_path.with_suffix(".manifest.csv")
    paths = _read_manifest(manifest, rows=vectors.shape[0])
    meta = _read_meta(array_path.with_suffix(".json"), vectors.shape)
    _check_inside(manifest, paths, meta.get("data_dir"))
    return Embeddings(array_path, vectors, paths, meta)


def _check_inside(manifest: Path, paths: Sequence[Path], data_dir: object) -> None:
    """Every listed file must lie in the folder that was embedded, as embed wrote it.

    Sheets, maps and HTML pages open and name the files a manifest lists; an edited or
    foreign manifest naming ../../etc/passwd or /home/someone/private.jpg must not make them
    read files outside the embedded folder. Paths are compared as written, not resolved:
    embed lists files under their folder's own name, symlinked subfolders included.
    """
    if not isinstance(data_dir, str) or not data_dir:
        raise DataError(
            f"{manifest.with_suffix('').with_suffix('.json')}: names no embedded folder "
            "(data_dir); it was edited or not written by simclr embed: run it again"
        )
    root = os.path.abspath(data_dir)
    for path in paths:
        text = str(path)
        if ".." in path.parts or not path.is_absolute():
            raise DataError(
                f"{manifest}: {text!r} is not an absolute path inside the embedded folder; "
                "the manifest was edited or not written by simclr embed: run it again"
            )
        if os.path.commonpath([root, text]) != root:
            raise DataError(
                f"{manifest}: {text} lies outside the embedded folder {root}; the manifest "
                "was edited or belongs to another index: run simclr embed again"
            )


def _read_manifest(manifest: Path, *, rows: int) -> list[Path]:
    """Paths in row order; every row of the array must appear exactly once."""
    if not manifest.is_file():
        raise DataError(
            f"{manifest}: manifest not found; it is written beside the .npy by simclr embed "
            "and maps rows to files"
        )
    by_row: dict[int, Path] = {}
    try:
        with manifest.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"row", "path"} <= set(reader.fieldnames):
                raise DataError(f"{manifest}: not an embed manifest (needs row and path columns)")
            for line, record in enumerate(reader, start=2):
                if not record["row"]:
                    continue  # a skipped file: listed, never embedded
                try:
                    row = int(record["row"])
                except ValueError:
                    raise DataError(
                        f"{manifest}:{line}: row {record['row']!r} is not a number"
                    ) from None
                if row in by_row or not 0 <= row < rows:
                    raise _mismatch(manifest, rows, f"row {row} on line {line}")
                by_row[row] = Path(record["path"])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{manifest}: cannot read the manifest ({error})") from None
    if len(by_row) != rows:
        raise _mismatch(manifest, rows, f"{len(by_row)} rows listed")
    return [by_row[row] for row in range(rows)]


def _mismatch(manifest: Path, rows: int, detail: str) -> DataError:
    return DataError(
        f"{manifest} does not match its array of {rows} rows ({detail}); the two come from "
        "different embed runs: run simclr embed again"
    )


def _read_meta(meta_path: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    # Required: it names the folder the manifest's files must lie in (see _check_inside);
    # without it an edited manifest could point the commands at any file on the machine.
    if not meta_path.is_file():
        raise DataError(
            f"{meta_path}: not found; simclr embed writes it beside the array (it names the "
            "model and the embedded folder): run simclr embed again"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{meta_path}: unreadable ({error})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: not an embed description")
    if (meta.get("rows"), meta.get("dim")) not in ((None, None), (shape[0], shape[1])):
        raise DataError(
            f"{meta_path} describes {meta.get('rows')} x {meta.get('dim')} vectors but the array "
            f"is {shape[0]} x {shape[1]}; run simclr embed again"
        )
    return meta


@dataclass
class QuerySkips(SkipLog):
    """Unreadable query images: an error for a file the user named, skipped if found in a folder.

    The error names the file alone: the commands that embed queries have no --strict.
    """

    skippable: frozenset[str] = frozenset()  # str(path) of the files found in query folders

    def record(self, path: str, reason: str) -> None:
        """Skip (and log) a file from a query folder; stop at a file named on its own."""
        if path not in self.skippable:
            raise DataError(f"{path}: {reason}")
        super().record(path, reason)


def embed_images(
    embeddings: Embeddings,
    paths: Sequence[Path],
    *,
    device: str = "auto",
    skip_log: SkipLog | None = None,
) -> torch.Tensor:
    """Vectors of images outside the index, made as `embed` made the index.

    Uses the model named in the index's `.json` and the same preprocessing and output
    (features or projection) as `simclr embed`. An unreadable image is an error unless
    `skip_log` skips it: the rows (n, D) are those of `paths` not in `skip_log.skipped`, in
    order.

    Raises:
        CheckpointError: The index does not say which model made it, or that model is gone.
        DataError: A query image cannot be read (and `skip_log` does not skip it).
    """
    from simclr_cli.engine.embed import iter_encoded
    from simclr_cli.models.export import load_model

    model_path = embeddings.meta.get("model")
    if not model_path:
        raise CheckpointError(
            f"{embeddings.array_path.with_suffix('.json')} is missing or names no model, so "
            "images outside the index cannot be embedded; query with paths listed in the index"
        )
    # embed records a local model as an absolute path and a Hub model as the reference given.
    local = Path(model_path).is_absolute()
    if local and not Path(model_path).exists():
        raise CheckpointError(
            f"the index was embedded with {model_path}, which no longer exists; images outside "
            "the index need that model"
        )
    model = load_model(Path(model_path) if local else str(model_path))
    projection = embeddings.meta.get("output") == "projection"
    _check_same_weights(embeddings, model, str(model_path), projection=projection)
    torch_device = resolve_device(device)
    # By default every file counts as named: a query must not be dropped silently.
    data = ImageBatches(
        list(paths),
        canvas_size=int(model.config["preprocessing"]["decode_size"]),
        num_workers=0,
        skip_log=skip_log if skip_log is not None else QuerySkips(),
    )
    batches = iter_encoded(
        model,
        data,
        device=torch_device,
        precision=resolve_precision("auto", torch_device),
        projection=projection,
    )
    parts = [rows for rows, _ in batches]  # in the order of `paths`
    if not parts:
        return torch.zeros(0, embeddings.dim)
    vectors = torch.cat(parts)  # (n, D)
    if vectors.shape[1] != embeddings.dim:
        raise CheckpointError(
            f"{model_path} now gives {vectors.shape[1]}-d vectors but the index holds "
            f"{embeddings.dim}-d ones; run simclr embed again"
        )
    return vectors


def _check_same_weights(
    embeddings: Embeddings, model: LoadedModel, model_path: str, *, projection: bool
) -> None:
    """Refuse a model whose weights are not those that made the index.

    vecs.json may name any file (it is the user's own path, or an edited one); whatever is
    there is loaded only safely (safetensors, or torch.load with weights_only), and then
    must match the weights embed recorded, or queries would land in another vector space.
    Indexes written before the record existed are not checked.
    """
    from simclr_cli.models.export import state_fingerprint

    recorded = embeddings.meta.get("weights_sha256")
    if not recorded:
        return
    weights = state_fingerprint(model.backbone)
    if projection and model.projection_head is not None:
        weights += "+" + state_fingerprint(model.projection_head)
    if weights != recorded:
        raise CheckpointError(
            f"{model_path} does not hold the weights that made this index (changed since "
            "simclr embed ran, or vecs.json was edited); run simclr embed again"
        )
