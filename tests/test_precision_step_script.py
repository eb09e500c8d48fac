"""Smoke test of benchmarks/precision_step.py, so CI keeps the script working."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_it_times_both_precisions_in_turns_and_says_whether_auto_chose_the_faster(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The suite pins `auto` to fp32 (conftest); here the script must see this CPU's answer.
    monkeypatch.delenv("SIMCLR_CPU_BF16", raising=False)
    module = load_benchmark("precision_step")
    out_path = tmp_path / "record.json"
    args = ["--sizes", "16", "--batch", "4", "--repeats", "2", "--matmul-side", "64"]
    module.main([*args, "--glibc-default", "--out", str(out_path)])
    out = capsys.readouterr().out

    record = json.loads(out_path.read_text(encoding="utf-8"))
    assert record["freed_memory_kept"] is False
    assert record["auto"] in ("fp32", "bf16")
    assert set(record["matmul_gflops"]) == {"fp32", "bf16"}
    assert all(
        rate["gflops"] > 0 and rate["side"] == 64 for rate in record["matmul_gflops"].values()
    )
    times = record["steps_ms"]["16"]
    assert set(times) == {"fp32", "bf16"}
    assert all(len(ms) == 2 and min(ms) > 0 for ms in times.values())
    line = re.search(r"at 16 px, ms, median of 2: fp32 (\d+), bf16 (\d+): bf16 ([\d.]+)x", out)
    assert line is not None, out
    medians = {name: statistics.median(ms) for name, ms in times.items()}
    faster = "fp32" if medians["fp32"] <= medians["bf16"] else "bf16"
    assert record["faster"] == {"16": faster}
    verdict = "every size" if faster == record["auto"] else "not every size"
    assert f"`auto` ({record['auto']}) was the faster precision at {verdict} timed" in out
