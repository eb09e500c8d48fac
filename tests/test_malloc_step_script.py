"""Smoke test of benchmarks/malloc_step.py, so CI keeps the script working."""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
def test_both_allocator_settings_are_measured_and_recorded(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    module = load_benchmark("malloc_step")
    out = tmp_path / "record.json"
    # Two tiny steps per fresh interpreter: the numbers mean nothing, the plumbing must hold.
    args = ["--sizes", "16", "--steps", "2", "--batch-size", "8", "--rounds", "1"]
    record = module.main([*args, "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    runs = record["16"]
    assert [r["kept"] for r in runs["glibc default"]] == [False]
    assert [r["kept"] for r in runs["keeps freed memory"]] == [True]
    for results in runs.values():
        steps = results[0]["steps"]
        assert len(steps) == 2 and all(s["seconds"] > 0 and s["minor_faults"] >= 0 for s in steps)
        assert results[0]["peak_rss_mib"] > 50  # torch alone is more than this
    table = capsys.readouterr().out
    assert "| 16 px | glibc default |" in table and "| 16 px | keeps freed memory |" in table
