"""Smoke test of benchmarks/cli_vs_lightly.py: the commands run, are timed and read back."""

from __future__ import annotations

import json
import re
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
    assert re.search(rf"\$ \S*/simclr pretrain {re.escape(str(small))} ", out), out
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
    assert "simclr/lightly" in out
    assert re.search(r"\$ cd \S+\n  \$ \S*/lightly-ssl-train input_dir=", out), out


def test_it_refuses_what_would_not_compare_before_running_anything(
    digit_folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    _, small = digit_folders
    module = load_benchmark("cli_vs_lightly")
    mixed = tmp_path / "mixed"
    shutil.copytree(small, mixed)
    for path in sorted((mixed / "0").iterdir())[:5]:
        shutil.move(path, mixed / path.name)
    small_run = ["--batch-size", "16", "--epochs", "1", "--image-size", "16"]

    # lightly's commands would read only the sub-folders; simclr reads every file.
    with pytest.raises(SystemExit, match="5 images at its top and 35 in sub-folders"):
        module.main(["--data", str(mixed), *small_run, "--work-dir", str(tmp_path / "w1")])
    assert not (tmp_path / "w1" / "round0").exists()

    used = tmp_path / "used"
    (used / "round0").mkdir(parents=True)
    for argv in (
        ["--data", str(small), "--work-dir", str(used)],
        ["--data", str(tmp_path / "missing")],
        ["--dataset", "photos", "--data", str(small)],
        ["--repeats", "0"],
    ):
        with pytest.raises(SystemExit) as stopped:
            module.main([*argv, *small_run])
        assert stopped.value.code == 2, argv  # argparse's usage error, one line on stderr
    errors = capsys.readouterr().err
    assert "is not empty; give a new or empty folder" in errors
    assert "missing: no such folder" in errors
    assert "not allowed with argument" in errors


def test_a_failed_command_keeps_the_temporary_work_folder_for_its_log(
    digit_folders: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    _, small = digit_folders
    module = load_benchmark("cli_vs_lightly")
    with pytest.raises(SystemExit, match=r"simclr exited with \d+; its output is in (\S+)"):
        module.main(["--data", str(small), "--sides", "simclr", "--batch-size", "16",
                     "--epochs", "0"])  # fmt: skip
    kept = capsys.readouterr().err.split("work folder kept for the logs: ")[1].strip()
    log = Path(kept) / "round0" / "simclr" / "simclr-pretrain.log"
    try:
        assert "epochs" in log.read_text(encoding="utf-8")
    finally:
        shutil.rmtree(kept)
