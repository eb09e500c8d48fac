"""Smoke test of benchmarks/embed_vs_plain.py, so CI keeps the script working.

It embeds a dozen real photo crops once per pipeline; the rates mean nothing, the test only
proves that each measurement is taken, recorded and consistent with the others.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def loaded_bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("embed_vs_plain")


@pytest.fixture
def embed_bench(loaded_bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # The script changes malloc for its whole process; not for the test process.
    monkeypatch.setattr(loaded_bench, "keep_freed_memory", lambda: False)
    return loaded_bench


def test_embed_comparison_records_both_pipelines_and_the_bound(
    embed_bench: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "record.json"
    # fp32 only: a CPU without bf16 instructions emulates bf16 products very slowly.
    record = embed_bench.main(
        [
            "--images", "12", "--image-size", "32", "--batch-size", "8", "--workers", "0",
            "--precision", "fp32", "--repeats", "1", "--work-dir", str(tmp_path / "work"),
            "--out", str(out),
        ]
    )  # fmt: skip

    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["images"] >= 10  # crops are taken per source photo, so 12 may round down
    fp32 = record["results"]["fp32"]
    assert len(fp32["plain_images_per_s"]) == len(fp32["ours_images_per_s"]) == 1
    assert fp32["plain_images_per_s"][0] > 0 and fp32["ours_images_per_s"][0] > 0
    assert fp32["ratio_median"] == pytest.approx(
        fp32["ours_images_per_s"][0] / fp32["plain_images_per_s"][0]
    )
    assert fp32["matmul_gflops"] > 0
    assert fp32["bound_images_per_s"] == pytest.approx(
        fp32["matmul_gflops"] * 1e9 / (record["embed_gflop_per_image"] * 1e9)
    )
    assert record["freed_memory_kept"] is False
    assert "| fp32 |" in capsys.readouterr().out


def test_a_reused_work_dir_keeps_its_photos_and_says_so(
    embed_bench: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A second run in the same folder times the same files, whatever --images says now.
    common = [
        "--image-size", "32", "--batch-size", "8", "--workers", "0", "--precision", "fp32",
        "--repeats", "1", "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    first = embed_bench.main(["--images", "12", *common])
    assert "reusing" not in capsys.readouterr().out
    second = embed_bench.main(["--images", "40", *common])
    assert second["images"] == first["images"]
    assert f"reusing the {first['images']} photos already in" in capsys.readouterr().out


@pytest.mark.parametrize("images", ["-5", "0", "11"])
def test_fewer_images_than_source_photos_is_a_usage_error(
    embed_bench: ModuleType, images: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Below one crop per source photo the set would silently round up to 12.
    with pytest.raises(SystemExit) as stop:
        embed_bench.main(["--images", images])
    assert stop.value.code == 2
    assert "--images must be at least 12" in capsys.readouterr().err


def test_an_unfinished_photo_folder_is_not_timed(embed_bench: ModuleType, tmp_path: Path) -> None:
    # What a first run stopped while saving crops leaves: photos but no completion mark.
    (tmp_path / "work" / "photos" / "train" / "coffee").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        embed_bench.main(["--images", "12", "--work-dir", str(tmp_path / "work")])
    assert "is not a complete set made by this script" in str(stop.value.code)
