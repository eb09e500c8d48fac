"""Cosine-similarity search over embedding rows: exact in torch, or approximate with faiss.

Exact search streams the index in chunks (`BANK_CHUNK_ROWS` rows at a time, normalised on the
fly), so memory stays bounded whatever the number of rows: a million 512-d rows are read
from the memory-mapped `.npy` 64k rows at a time. The approximate index is faiss's HNSW graph
(https://github.com/facebookresearch/faiss, `pip install "simclr-cli[ann]"`); it is chosen
automatically only when it is installed and an exact search would cost more than building the
graph does (`choose_method`).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from simclr_cli.errors import ConfigError

__all__ = [
    "APPROX_MIN_ROWS",
    "METHODS",
    "Neighbors",
    "approx_available",
    "choose_method",
    "pairs_above",
    "top_k",
]

logger = logging.getLogger(__name__)

METHODS = ("auto", "exact", "approx")

BANK_CHUNK_ROWS = 65536  # rows of the index on the device at once: 128 MiB at 512-d
QUERY_CHUNK_ROWS = 512  # a (512, 65536) float32 similarity block is 128 MiB

# Measured on 2 busy CPU cores with 512-d random vectors (docs/neighbors.md): exact search
# runs about 2e7 row-query products per second, while building the HNSW graph over 20,000 rows
# took 65 s (exact all-pairs over the same rows: 9 s). The graph grows about linearly with rows,
# exact work with rows x queries, so the graph pays off only from roughly 200k rows searched by
# as many queries (a `duplicates` run); a few queries are always cheaper exactly.
APPROX_MIN_ROWS = 200_000
_APPROX_MIN_PRODUCT = 4 * 10**10  # rows x queries

# HNSW settings: 32 links per node and a wide search beam keep recall near 1 at our sizes.
_HNSW_LINKS = 32
_HNSW_BUILD_BEAM = 200
_HNSW_MIN_SEARCH_BEAM = 128


@dataclass(frozen=True)
class Neighbors:
    """Per query, the k most similar rows: similarities (Q, k) descending, row indices (Q, k)."""

    similarities: torch.Tensor
    indices: torch.Tensor


def approx_available() -> bool:
    """Whether faiss (the optional approximate index) is importable."""
    return importlib.util.find_spec("faiss") is not None


def choose_method(method: str, *, rows: int, queries: int) -> str:
    """Resolve `auto` to `exact` or `approx`; `approx` without faiss is an error."""
    if method not in METHODS:
        raise ConfigError(f"unknown search method {method!r}; use one of {', '.join(METHODS)}")
    if method == "approx" and not approx_available():
        raise ConfigError(
            'approximate search needs faiss: pip install "simclr-cli[ann]" (or faiss-cpu)'
        )
    if method != "auto":
        return method
    large = rows >= APPROX_MIN_ROWS and rows * queries >= _APPROX_MIN_PRODUCT
    return "approx" if large and approx_available() else "exact"


def _bank_chunks(
    bank: npt.NDArray[np.floating], device: torch.device, chunk_rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, unit rows (c, D) on device) for consecutive chunks of a (memory-mapped) bank."""
    for start in range(0, bank.shape[0], chunk_rows):
        rows = torch.from_numpy(np.array(bank[start : start + chunk_rows], dtype=np.float32))
        yield start, F.normalize(rows.to(device=device, dtype=torch.float32), dim=1)


def top_k(
    bank: npt.NDArray[np.floating],
    queries: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    device: torch.device | None = None,
    chunk_rows: int = BANK_CHUNK_ROWS,
) -> Neighbors:
    """The k rows of `bank` (N, D) with the highest cosine similarity to each query (Q, D)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    k = min(k, bank.shape[0])
    method = choose_method(method, rows=bank.shape[0], queries=queries.shape[0])
    if method == "approx":
        return _approx_top_k(bank, queries, k)
    return _exact_top_k(
        bank, queries, k, device=device or torch.device("cpu"), chunk_rows=chunk_rows
    )


@torch.no_grad()
def _exact_top_k(
    bank: npt.NDArray[np.floating],
    queries: torch.Tensor,
    k: int,
    *,
    device: torch.device,
    chunk_rows: int,
) -> Neighbors:
    unit_queries = F.normalize(queries.to(device=device, dtype=torch.float32), dim=1)  # (Q, D)
    best = torch.full((len(queries), k), -torch.inf, device=device)
    best_index = torch.zeros((len(queries), k), dtype=torch.long, device=device)
    # Bank outer, queries inner: each chunk of the file is read once however many queries.
    for start, chunk in _bank_chunks(bank, device, chunk_rows):
        for q0 in range(0, len(queries), QUERY_CHUNK_ROWS):
            q1 = q0 + QUERY_CHUNK_ROWS
            similarity = unit_queries[q0:q1] @ chunk.T  # (q, c)
            values, index = similarity.topk(min(k, chunk.shape[0]), dim=1)  # (q, <=k)
            merged = torch.cat([best[q0:q1], values], dim=1)  # (q, k + <=k)
            merged_index = torch.cat([best_index[q0:q1], index + start], dim=1)
            keep_values, keep = merged.topk(k, dim=1)  # (q, k)
            best[q0:q1] = keep_values
            best_index[q0:q1] = merged_index.gather(1, keep)
    return Neighbors(best.cpu(), best_index.cpu())


def _faiss_index(bank: npt.NDArray[np.floating]) -> Any:
    """An HNSW inner-product graph over the unit rows of `bank`."""
    import faiss

    logger.info("building an approximate (HNSW) index over %d rows", bank.shape[0])
    index = faiss.IndexHNSWFlat(bank.shape[1], _HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = _HNSW_BUILD_BEAM
    for _, chunk in _bank_chunks(bank, torch.device("cpu"), BANK_CHUNK_ROWS):
        index.add(chunk.numpy())
    return index


def _approx_top_k(bank: npt.NDArray[np.floating], queries: torch.Tensor, k: int) -> Neighbors:
    index = _faiss_index(bank)
    unit_queries = F.normalize(queries.float(), dim=1).numpy()
    return _faiss_search(index, unit_queries, k)


def _faiss_search(index: Any, unit_queries: npt.NDArray[np.float32], k: int) -> Neighbors:
    index.hnsw.efSearch = max(_HNSW_MIN_SEARCH_BEAM, 2 * k)
    similarities, indices = index.search(unit_queries, k)  # (Q, k) each; -1 where none found
    return Neighbors(torch.from_numpy(similarities), torch.from_numpy(indices.astype(np.int64)))


def pairs_above(
    bank: npt.NDArray[np.floating],
    threshold: float,
    *,
    method: str = "auto",
    device: torch.device | None = None,
    approx_neighbors: int = 32,
    chunk_rows: int = 4096,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """All pairs of rows i < j with cosine similarity >= threshold, in batches (i, j, sim).

    Exact search compares every pair, chunk by chunk, N^2/2 products in all. Approximate search
    looks only at each row's `approx_neighbors` nearest rows: a group larger than that is still
    found whole as long as its members are linked through chains of near neighbours.
    `progress` is called with the number of rows whose pairs are all found so far.
    """
    progress = progress or (lambda done: None)
    rows = bank.shape[0]
    method = choose_method(method, rows=rows, queries=rows)
    if method == "approx":
        index = _faiss_index(bank)
        for start, unit in _bank_chunks(bank, torch.device("cpu"), chunk_rows):
            found = _faiss_search(index, unit.numpy(), min(approx_neighbors + 1, rows))
            i = torch.arange(start, start + len(unit))[:, None].expand_as(found.indices)  # (c, k)
            keep = (found.similarities >= threshold) & (found.indices > i)
            yield i[keep], found.indices[keep], found.similarities[keep]
            progress(start + len(unit))
        return
    yield from _exact_pairs(
        bank,
        threshold,
        device=device or torch.device("cpu"),
        chunk_rows=chunk_rows,
        progress=progress,
    )


@torch.no_grad()
def _exact_pairs(
    bank: npt.NDArray[np.floating],
    threshold: float,
    *,
    device: torch.device,
    chunk_rows: int,
    progress: Callable[[int], None],
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    # (4096, 4096) float32 similarity blocks by default: 64 MiB each.
    for a0, rows_a in _bank_chunks(bank, device, chunk_rows):
        for b0, rows_b in _bank_chunks(bank[a0:], device, chunk_rows):
            b0 += a0
            similarity = rows_a @ rows_b.T  # (a, b)
            i, j = torch.nonzero(similarity >= threshold, as_tuple=True)
            i, j = i + a0, j + b0
            upper = i < j  # each pair once, no self-pairs
            yield i[upper].cpu(), j[upper].cpu(), similarity[i[upper] - a0, j[upper] - b0].cpu()
        # Limitation: later blocks compare fewer pairs, so an ETA from rows overestimates.
        progress(a0 + len(rows_a))
