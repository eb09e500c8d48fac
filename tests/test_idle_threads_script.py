"""Smoke test of benchmarks/idle_threads.py, so CI keeps the script working."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_both_arms_run_the_real_command_and_are_recorded(
    tmp_path: Path,
    few_digits: Path,
    encoder_dir: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    module = load_benchmark("idle_threads")
    out = tmp_path / "record.json"
    # One run per arm on 60 digits: the numbers mean nothing, the plumbing must hold.
    args = ["--data", str(few_digits), "--model", str(encoder_dir), "--precision", "fp32"]
    record = module.main([*args, "--repeats", "1", "--work-dir", str(tmp_path), "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert record["images"] == 60
    result = record["results"]["fp32"]
    assert set(result["images_per_s"]) == {"passive (as shipped)", "OpenMP defaults"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["images_per_s"].values())
    assert result["passive_over_default"] > 0
    # Each run really embedded the folder: the command's own output is there, one row each.
    assert (tmp_path / "vecs.manifest.csv").read_text().count("\n") == 61
    assert "fp32  passive" in capsys.readouterr().out
