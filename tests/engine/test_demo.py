from pathlib import Path

import pytest

from simclr_cli.engine.demo import run_demo


@pytest.mark.slow
def test_demo_pretraining_beats_random_init_by_five_points(tmp_path: Path) -> None:
    # The README's promise: the default demo gains at least 5 kNN points over random init.
    result = run_demo(tmp_path, device="cpu")
    assert result.train_images == 4000 and result.test_images == 1000
    assert result.gain >= 5.0, f"{result.knn_random_init:.3f} -> {result.knn_pretrained:.3f}"
