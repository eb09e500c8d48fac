"""Smoke test of benchmarks/cli_vs_lightly.py: the commands run, are timed and read back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def digit_folders(
    tmp_path_factory: pytest.TempPathFactory, load_benchmark: Callable[[str], ModuleType]
) -> tuple[Path, Path]:
    """The script's own digit folder, and 40 of its zeros and ones in one folder per digit."""
    module = load_benchmark("cli_vs_lightly")
    root = tmp_path_factory.mktemp("digits")
    every = module.write_sklearn_digits(root / "all" / "digits")
    small = root / "small"
    for digit in ("0", "1"):
        (small / digit).mkdir(parents=True)
        for path in sorted(every.glob(f"*-{digit}.png"))[:20]:
            shutil.copy(path, small / digit / path.name)
    return every, small


def test_the_default_data_is_every_sklearn_digit_named_by_its_label(
    digit_folders: tuple[Path, Path],
) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    every, _ = digit_folders
    files = sorted(every.glob("*.png"))
    assert len(files) == 1797
    assert [f.name for f in files[:3]] == ["0000-0.png", "0001-1.png", "0002-2.png"]
    source = load_digits()
    for index in (0, 1796):
        with Image.open(files[index]) as image:
            assert (image.mode, image.size) == ("L", (8, 8))
            pixels = np.asarray(image)
        # Counts 0..16 of on pixels, stretched to 0..255.
        np.testing.assert_array_equal(pixels, np.rint(source.images[index] * 255 / 16))
        assert files[index].stem.endswith(f"-{source.target[index]}")


def _run(module: ModuleType, small: Path, tmp_path: Path, sides: list[str]) -> tuple[dict, dict]:
    out = tmp_path / "record.json"
    returned = module.main(["--data", str(small), "--batch-size", "16", "--epochs", "1",
                            "--image-size", "16", "--workers", "0", "--sides", *sides,
                            "--work-dir", str(tmp_path / "work"), "--out", str(out)])  # fmt: skip
    return returned, json.loads(out.read_text(encoding="utf-8"))


def test_it_times_simclrs_two_commands_and_scores_their_embedding(
    digit_folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    _, small = digit_folders
    module = load_benchmark("cli_vs_lightly")
    returned, record = _run(module, small, tmp_path, ["simclr"])
    out = capsys.readouterr().out

    assert record == json.loads(json.dumps(returned))
    (result,) = record["rounds"]["simclr"]
    # 40 images, batch 16: two full batches per epoch, the partial one dropped.
    assert result["images_trained"] == 32 == result["steps_x_batch"]
    assert result["embedded_rows"] == 40 and result["feature_width"] == 512
    assert result["pretrain_images_per_s"] == pytest.approx(32 / result["pretrain_seconds"])
    assert result["embed_images_per_s"] == pytest.approx(40 / result["embed_seconds"])
    assert 0 <= result["knn_top1"] <= 100
    assert result["precision"] in ("fp32", "bf16")
    assert "--workers 0" in " ".join(result["pretrain_command"])
    assert f"$ simclr pretrain {small}" in out
    assert "images trained / s" in out and "simclr/lightly" not in out
    assert (tmp_path / "work" / "round0" / "simclr" / "simclr-run" / "model.safetensors").exists()


@pytest.mark.skipif(
    shutil.which("lightly-ssl-train") is None, reason="lightly (the bench extra) not installed"
)
def test_lightlys_commands_run_offline_with_the_same_settings(
    digit_folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    _, small = digit_folders
    module = load_benchmark("cli_vs_lightly")
    _, record = _run(module, small, tmp_path, ["simclr", "lightly"])
    out = capsys.readouterr().out

    (theirs,) = record["rounds"]["lightly"]
    command = " ".join(theirs["pretrain_command"])
    settings = ["pre_trained=False", "collate.input_size=16", "loader.batch_size=16",
                "trainer.max_epochs=1", "model.num_ftrs=512", "loader.num_workers=0"]  # fmt: skip
    assert all(setting in command for setting in settings), command
    assert theirs["embedded_rows"] == 40 and theirs["feature_width"] == 512
    assert 0 <= theirs["knn_top1"] <= 100
    ours = record["rounds"]["simclr"][0]
    ratio = record["summary"]["simclr_over_lightly"]["pretrain_images_per_s"]
    assert ratio == pytest.approx(ours["pretrain_images_per_s"] / theirs["pretrain_images_per_s"])
    assert "simclr/lightly" in out and "$ lightly-ssl-train" in out
