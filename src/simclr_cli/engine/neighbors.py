"""Nearest neighbours of query images in an embedding index, as lists and contact sheets.

A query that is already in the index uses its stored row (and is left out of its own
results); any other image is embedded on the fly with the model that made the index.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simclr_cli.data.images import scan_images
from simclr_cli.device import resolve_device
from simclr_cli.engine.embeddings import Embeddings, embed_images
from simclr_cli.engine.search import top_k
from simclr_cli.engine.sheets import Tile, draw_grid, load_thumbnails, save_png
from simclr_cli.errors import ConfigError, DataError

__all__ = ["NeighborResult", "expand_queries", "find_neighbors", "write_neighbor_sheets"]


@dataclass(frozen=True)
class NeighborResult:
    """One query and its neighbours as (row, cosine similarity), most similar first."""

    query: Path
    in_index: bool
    neighbors: list[tuple[int, float]]


def expand_queries(
    queries: Sequence[Path], *, exclude: Sequence[Path] = ()
) -> tuple[list[Path], bool]:
    """Image files named directly or found in named folders; True if any folder was named.

    Paths in `exclude` (the sheets this command writes) are never taken from a folder, so
    sheets written into a query folder do not become queries the next time.
    """
    files: list[Path] = []
    any_folder = False
    for query in queries:
        if query.is_dir():
            any_folder = True
            found = scan_images(query, exclude=exclude)
            if not found:
                raise DataError(f"{query}: no images in this query folder")
            files.extend(found)
        elif query.is_file():
            files.append(Path(os.path.abspath(query)))
        else:
            raise DataError(f"{query}: no such image file or folder")
    return files, any_folder


def find_neighbors(
    embeddings: Embeddings,
    queries: Sequence[Path],
    *,
    k: int = 8,
    method: str = "auto",
    device: str = "auto",
) -> list[NeighborResult]:
    """The k nearest rows of every query image."""
    if k < 1:
        raise ConfigError(f"-k must be at least 1, got {k}")
    rows = [embeddings.row_of(query) for query in queries]
    vectors = torch.empty(len(queries), embeddings.dim)  # (Q, D)
    outside = [i for i, row in enumerate(rows) if row is None]
    if outside:
        vectors[outside] = embed_images(embeddings, [queries[i] for i in outside], device=device)
    inside = [i for i, row in enumerate(rows) if row is not None]
    if inside:
        stored_rows = [row for row in rows if row is not None]
        stored = np.asarray(embeddings.vectors[stored_rows], dtype=np.float32)  # (q, D)
        vectors[inside] = torch.from_numpy(stored)

    # One extra neighbour so that a query from the index can drop itself and still have k.
    found = top_k(embeddings.vectors, vectors, k + 1, method=method, device=resolve_device(device))
    results = []
    for number, query in enumerate(queries):
        pairs = [
            (int(row), float(similarity))
            for row, similarity in zip(
                found.indices[number], found.similarities[number], strict=True
            )
            if int(row) >= 0 and int(row) != rows[number]
        ]
        results.append(NeighborResult(query, rows[number] is not None, pairs[:k]))
    return results


def neighbor_sheet(
    result: NeighborResult, embeddings: Embeddings, *, tile_size: int = 160
) -> Image.Image:
    """The query (red frame) then its neighbours, each captioned with name and similarity."""
    paths = [result.query] + [embeddings.paths[row] for row, _ in result.neighbors]
    thumbs = load_thumbnails(paths, tile_size)
    tiles = [Tile(thumbs[0], ("query", result.query.name), highlight=True)]
    tiles += [
        Tile(thumb, (f"{rank}. cos {similarity:.4f}", embeddings.paths[row].name))
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
