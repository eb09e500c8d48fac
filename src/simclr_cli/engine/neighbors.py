"""Nearest neighbours of query images in an embedding index, as lists and contact sheets.

A query that is already in the index uses its stored row (and is left out of its own
results); any other image, or an indexed file modified after the index was written, is
embedded on the fly with the model that made the index.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simclr_cli.data.images import scan_images
from simclr_cli.device import resolve_device
from simclr_cli.engine.embeddings import Embeddings, QuerySkips, embed_images
from simclr_cli.engine.search import top_k
from simclr_cli.engine.sheets import Tile, draw_grid, load_thumbnails, save_png
from simclr_cli.errors import ConfigError, DataError

__all__ = [
    "NeighborResult",
    "Queries",
    "expand_queries",
    "find_neighbors",
    "write_neighbor_sheets",
]

logger = logging.getLogger(__name__)

_NAMES_SHOWN = 5  # files named in a one-line warning before "and N more"


@dataclass(frozen=True)
class NeighborResult:
    """One query and its neighbours as (row, cosine similarity), most similar first."""

    query: Path
    in_index: bool
    neighbors: list[tuple[int, float]]


@dataclass(frozen=True)
class Queries:
    """Query image files in order, and which of them were found in folders (not named)."""

    files: list[Path]
    from_folders: frozenset[Path] = field(default_factory=frozenset)

    @property
    def any_folder(self) -> bool:
        """Whether a folder was among the queries (then each query gets a sheet of its own)."""
        return bool(self.from_folders)


def expand_queries(queries: Sequence[Path], *, exclude: Sequence[Path] = ()) -> Queries:
    """Image files named directly or found in named folders.

    Paths in `exclude` (the sheets this command writes) are never taken from a folder, so
    sheets written into a query folder do not become queries the next time.
    """
    files: list[Path] = []
    from_folders: set[Path] = set()
    named: set[Path] = set()
    for query in queries:
        if query.is_dir():
            found = scan_images(query, exclude=exclude)
            if not found:
                raise DataError(f"{query}: no images in this query folder")
            files.extend(found)
            from_folders.update(found)
        elif query.is_file():
            files.append(Path(os.path.abspath(query)))
            named.add(files[-1])
        else:
            raise DataError(f"{query}: no such image file or folder")
    # A file named on its own stays an error when unreadable, even if a named folder holds it.
    return Queries(files, frozenset(from_folders - named))


def find_neighbors(
    embeddings: Embeddings,
    queries: Sequence[Path],
    *,
    k: int = 8,
    method: str = "auto",
    device: str = "auto",
    skippable: Collection[Path] = (),
) -> list[NeighborResult]:
    """The k nearest rows of every query image.

    An unreadable query is an error, unless it is in `skippable` (found in a query folder):
    then it is skipped with a warning and has no result. An indexed file modified after the
    index was written is embedded afresh, with a warning, instead of using its stale row.
    """
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    own_rows = [embeddings.row_of(query) for query in queries]  # left out of their results
    stale = _changed_since_indexed(embeddings, queries, own_rows)
    stored_rows = [None if i in stale else row for i, row in enumerate(own_rows)]
    vectors = torch.empty(len(queries), embeddings.dim)  # (Q, D)
    skips = QuerySkips(skippable=frozenset(str(path) for path in skippable))
    outside = [i for i, row in enumerate(stored_rows) if row is None]
    if outside:
        fresh = embed_images(
            embeddings, [queries[i] for i in outside], device=device, skip_log=skips
        )
        embedded = [i for i in outside if str(queries[i]) not in skips.skipped]
        vectors[embedded] = fresh
    inside = [i for i, row in enumerate(stored_rows) if row is not None]
    if inside:
        rows = [row for row in stored_rows if row is not None]  # in the order of `inside`
        stored = np.asarray(embeddings.vectors[rows], dtype=np.float32)  # (q, D)
        vectors[inside] = torch.from_numpy(stored)
    answered = [i for i, query in enumerate(queries) if str(query) not in skips.skipped]
    if skips.count:
        if not answered:
            raise DataError(
                f"none of the {len(queries)} query images could be read (each is named above)"
            )
        logger.warning(
            "skipped %d of %d query images: unreadable (each named above)",
            skips.count,
            len(queries),
        )

    # One extra neighbour so that a query from the index can drop itself and still have k.
    found = top_k(
        embeddings.vectors, vectors[answered], k + 1, method=method, device=resolve_device(device)
    )
    results = []
    for number, i in enumerate(answered):
        pairs = [
            (int(row), float(similarity))
            for row, similarity in zip(
                found.indices[number], found.similarities[number], strict=True
            )
            if int(row) >= 0 and int(row) != own_rows[i]
        ]
        results.append(NeighborResult(queries[i], stored_rows[i] is not None, pairs[:k]))
    return results


def _changed_since_indexed(
    embeddings: Embeddings, queries: Sequence[Path], rows: Sequence[int | None]
) -> set[int]:
    """Positions of indexed queries whose file was modified after the index was written.

    Their stored row describes the file as it was; a file replaced since (same name, new
    picture) would otherwise be answered with the old picture's neighbours.
    """
    try:
        written = embeddings.array_path.stat().st_mtime
    except OSError:
        return set()
    stale = set()
    for i, (query, row) in enumerate(zip(queries, rows, strict=True)):
        if row is None:
            continue
        try:
            if query.stat().st_mtime > written:
                stale.add(i)
        except OSError:
            continue  # gone since it was named; reading it will say so
    if stale:
        names = [queries[i].name for i in sorted(stale)]
        shown = ", ".join(names[:_NAMES_SHOWN])
        more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
        logger.warning(
            "%d query image%s modified after the index was written, so embedded afresh: "
            "%s%s; run simclr embed again to update the index",
            len(names),
            "" if len(names) == 1 else "s",
            shown,
            more,
        )
    return stale


def neighbor_sheet(
    result: NeighborResult, embeddings: Embeddings, *, tile_size: int = 160
) -> Image.Image:
    """The query (red frame) then its neighbours, each captioned with name and similarity."""
    paths = [result.query] + [embeddings.paths[row] for row, _ in result.neighbors]
    thumbs = load_thumbnails(paths, tile_size)
    tiles = [Tile(thumbs[0], ("query", result.query.name), highlight=True)]
    tiles += [
        Tile(
            thumb,
            (
                f"{rank}. cos {similarity:.4f}",
                embeddings.paths[row].name,
                *((f"({status})",) if (status := embeddings.file_status(row)) else ()),
            ),
        )
        for rank, (thumb, (row, similarity)) in enumerate(
            zip(thumbs[1:], result.neighbors, strict=True), start=1
        )
    ]
    where = "in the index" if result.in_index else "embedded now"
    title = f"{result.query} ({where}): {len(result.neighbors)} nearest of {embeddings.rows}"
    return draw_grid([tiles], tile_size=tile_size, title=title)


def write_neighbor_sheets(
    results: Sequence[NeighborResult],
    embeddings: Embeddings,
    out: Path | None,
    *,
    one_per_file: bool,
) -> list[Path]:
    """One sheet per query: `out` (default neighbors.png) for a single query, else a folder.

    Several queries (or a query folder) write `<out>/<image name>.png`, `out` defaulting to
    `neighbors/`; names that repeat get `-2`, `-3`, ...
    """
    if not one_per_file and len(results) == 1:
        target = out or Path("neighbors.png")
        return [save_png(neighbor_sheet(results[0], embeddings), target)]
    folder = out or Path("neighbors")
    if folder.suffix.lower() == ".png":
        raise ConfigError(
            f"{folder}: several queries write one sheet each; give -o a folder, not a .png"
        )
    written: list[Path] = []
    used: set[str] = set()
    for result in results:
        name, copy = result.query.stem, 1
        while name in used:
            copy += 1
            name = f"{result.query.stem}-{copy}"
        used.add(name)
        written.append(save_png(neighbor_sheet(result, embeddings), folder / f"{name}.png"))
    return written
