from pathlib import Path

import numpy as np
import pytest
import torch

from simclr_cli.engine import search
from simclr_cli.engine.embed import EmbedOptions, embed_folder
from simclr_cli.engine.search import choose_method, pairs_above, top_k
from simclr_cli.errors import ConfigError

needs_faiss = pytest.mark.skipif(not search.approx_available(), reason="faiss not installed")


@pytest.fixture(scope="module")
def digit_vectors(
    digits_folder: Path, encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> np.ndarray:
    """Features of 200 real digits from the random 16 px encoder, memory-mapped like an index."""
    out = tmp_path_factory.mktemp("digit_vectors") / "vecs.npy"
    embed_folder(digits_folder, encoder_dir, out, options=EmbedOptions(num_workers=0))
    return np.load(out, mmap_mode="r")


def brute_force(bank: np.ndarray) -> np.ndarray:
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    return unit @ unit.T


def test_chunked_exact_search_equals_the_full_similarity_matrix(digit_vectors: np.ndarray) -> None:
    # Chunks of 7 rows (not dividing 200) must merge into the same top-k as one full matmul.
    queries = torch.from_numpy(np.array(digit_vectors[::9]))
    found = top_k(digit_vectors, queries, 10, method="exact", chunk_rows=7)
    full = brute_force(np.asarray(digit_vectors, dtype=np.float64))[::9]
    expected = np.argsort(-full, axis=1, kind="stable")[:, :10]
    assert found.indices.shape == (len(queries), 10)
    assert np.array_equal(found.indices.numpy(), expected)
    assert np.allclose(found.similarities.numpy(), np.take_along_axis(full, expected, 1), atol=1e-5)


def test_k_larger_than_the_index_returns_every_row(digit_vectors: np.ndarray) -> None:
    # Asking for more neighbours than rows gives each row once, not padding or an error.
    bank = np.asarray(digit_vectors[:5])
    found = top_k(bank, torch.from_numpy(bank[:1].copy()), 50, method="exact")
    assert sorted(found.indices[0].tolist()) == [0, 1, 2, 3, 4]


def test_exact_pairs_match_brute_force_at_a_threshold(digit_vectors: np.ndarray) -> None:
    # Every pair i<j at or above the threshold, once, across chunk boundaries.
    full = brute_force(np.asarray(digit_vectors, dtype=np.float64))
    # Halfway between two neighbouring pair values, so float32 rounding cannot flip a pair.
    values = np.sort(full[np.triu_indices(200, 1)])
    threshold = float(values[-200:-198].mean())
    found = set()
    for i, j, _ in pairs_above(digit_vectors, threshold, method="exact", chunk_rows=33):
        found.update(zip(i.tolist(), j.tolist(), strict=True))
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(full >= threshold, 1)), strict=True)}
    assert found == expected and len(found) == 199


def test_auto_is_exact_for_small_indexes_and_approx_needs_faiss(monkeypatch) -> None:
    # auto never builds a graph for a small search; approx without faiss says how to get it.
    assert choose_method("auto", rows=150_000, queries=150_000) == "exact"
    assert choose_method("auto", rows=1_000_000, queries=1) == "exact"
    monkeypatch.setattr(search, "approx_available", lambda: False)
    assert choose_method("auto", rows=1_000_000, queries=1_000_000) == "exact"
    with pytest.raises(ConfigError, match=r"pip install"):
        choose_method("approx", rows=10, queries=10)
    with pytest.raises(ConfigError, match="unknown search method"):
        choose_method("fast", rows=10, queries=10)


@needs_faiss
def test_auto_picks_approx_for_a_large_search_when_faiss_is_installed() -> None:
    # With faiss, a million rows searched by a million queries goes to the graph.
    assert choose_method("auto", rows=1_000_000, queries=1_000_000) == "approx"


@needs_faiss
def test_approximate_search_agrees_with_exact_on_small_data(digit_vectors: np.ndarray) -> None:
    # On 200 real vectors the HNSW graph returns exactly the exact top-10, similarities included.
    queries = torch.from_numpy(np.array(digit_vectors))
    exact = top_k(digit_vectors, queries, 10, method="exact")
    approx = top_k(digit_vectors, queries, 10, method="approx")
    assert torch.equal(exact.indices, approx.indices)
    assert torch.allclose(exact.similarities, approx.similarities, atol=1e-5)
