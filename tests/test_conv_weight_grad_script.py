"""Smoke test of benchmarks/conv_weight_grad.py, so CI keeps the script working."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest


def test_it_times_each_layer_both_ways_and_marks_the_ones_the_engine_sends_to_matmul(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    load_benchmark: Callable[[str], ModuleType],
) -> None:
    # glibc's malloc settings are left alone: they would outlive the test in this process.
    module = load_benchmark("conv_weight_grad")
    out_path = tmp_path / "record.json"
    args = ["--arch", "resnet18", "--sizes", "32s", "--batch", "4", "--repeats", "1"]
    steps = ["--step", "16", "--step-repeats", "1", "--step-batch", "4"]
    module.main([*args, *steps, "--glibc-default", "--out", str(out_path)])
    out = capsys.readouterr().out

    record = json.loads(out_path.read_text(encoding="utf-8"))
    assert record["freed_memory_kept"] is False
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the model name, where platform.processor() is often empty
        names = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        assert record["processor"] == names[0].split(":", 1)[1].strip()
    assert record["load_average_at_start"] >= 0 and record["load_average_at_end"] >= 0
    layers = record["layers"]
    # A ResNet-18 with the small stem has 11 distinct convolution shapes, each in 2 precisions.
    assert len(layers) == 22
    assert all(layer["onednn_ms"] > 0 and layer["matmul_ms"] > 0 for layer in layers)
    # Both ways compute the same gradient, to bf16 rounding.
    assert all(layer["max_difference_relative"] < 2e-2 for layer in layers)
    # At 32 px the last stage runs at 4x4: its three shapes take the matrix product in bf16.
    used = {(tuple(layer["output"][2:]), layer["precision"]) for layer in layers if layer["used"]}
    assert used == {((4, 4), "bf16")}
    assert sum(layer["used"] for layer in layers) == 3
    assert len(re.findall(r" \*$", out, re.M)) == 3, out
    assert len(re.findall(r"x  diff \d\.\de[+-]\d\d", out)) == 22, out
    assert "load average at start" in out and "load average at end" in out

    line = re.search(
        r"at 16 px \((\w+)\), ms, median of 1: oneDNN (\d+), small-map path (\d+)", out
    )
    assert line is not None, out
    assert int(line.group(2)) > 0 and int(line.group(3)) > 0
    assert set(record["steps"]["16"]["ms"]) == {"oneDNN weight gradients", "small-map path"}
