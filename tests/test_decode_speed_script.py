"""Smoke test of benchmarks/decode_speed.py, so CI keeps the script working.

It decodes a few real photo crops and digits each way; the timings mean nothing here, the
test only proves that each measurement is taken under both ways and recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("skimage")
pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def decode_bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("decode_speed")


def test_decode_speed_times_both_ways_on_both_sets(
    decode_bench: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simclr_cli.data import images

    # The script changes malloc for its whole process; not for the test process.
    monkeypatch.setattr(decode_bench, "keep_freed_memory", lambda: False)
    default = images._VECTORISED_UINT8_RESIZE
    out = tmp_path / "record.json"
    record = decode_bench.main(
        [
            "--photos", "12", "--digits", "20", "--workers", "0", "--repeats", "1",
            "--photo-canvases", "192", "96",
            "--embed", "--work-dir", str(tmp_path / "work"), "--out", str(out),
        ]
    )  # fmt: skip
    assert images._VECTORISED_UINT8_RESIZE is default  # each way is undone after use
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert sorted(record["sets"]) == ["digits-64", "photos-192", "photos-96"]
    for name, canvas in (("photos-192", 192), ("photos-96", 96), ("digits-64", 64)):
        timings = record["sets"][name]
        assert timings["canvas"] == canvas and timings["images"] >= 12
        for way in ("torch", "pillow"):
            assert len(timings["per_image_ms"][way]) == 1 and timings["per_image_ms"][way][0] > 0
            assert len(timings["cache_fill_s"][way]) == 1 and timings["cache_fill_s"][way][0] > 0
        # The two ways agree to within rounding (see test_canvas_matches_pillows_own_resize).
        assert 0 <= timings["difference"]["max_levels"] <= 3
    assert all(rate[0] > 0 for rate in record["embed_images_per_s"].values())
    table = capsys.readouterr().out
    assert "| photos-192 (192 px canvas) |" in table and "| digits-64 (64 px canvas) |" in table
    assert "embed_folder on the photos (fp32)" in table


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--photos", "2"], "--photos 6"),
        (["--digits", "5000"], "--digits: at most 4000"),
        (["--photo-canvases", "192", "0"], "--photo-canvases: each side must be at least 1 px"),
        (["--workers", "-1"], "--workers must be 0"),
    ],
)
def test_bad_arguments_are_one_usage_line_before_any_work(
    decode_bench: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as stopped:
        decode_bench.main([*arguments, "--work-dir", str(tmp_path / "work")])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists()  # nothing was prepared
