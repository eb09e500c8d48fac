"""Smoke tests of benchmarks/bench_vs_lightly.py, so CI keeps the script working.

They run the script on a handful of real digits for one step; the numbers are not
benchmarks, only proof that every measurement is taken and recorded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

# 20 digits (2 per class), one step of 16, tiny matmuls: well under 20 s on two idle cores.
TINY = [
    "--config", "reference", "--images", "20", "--eval-images", "10", "--epochs", "1",
    "--batch-size", "16", "--seeds", "1", "--step-batches", "1", "--matmul-size", "128",
    "--workers", "0", "--in-process", "--no-init-baseline", "--precision", "fp32",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench(load_benchmark: Callable[[str], ModuleType]) -> ModuleType:
    return load_benchmark("bench_vs_lightly")


def _row(record: dict, metric: str) -> dict:
    return next(row for row in record["table"] if row["metric"] == metric)


@pytest.fixture
def malloc_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records calls to keep_freed_memory instead of changing malloc in the test process
    (--in-process jobs run here); tests/test_allocator.py checks the real effect."""
    import simclr_cli.allocator

    calls: list[str] = []

    def record() -> bool:
        calls.append("keep_freed_memory")
        return True

    monkeypatch.setattr(simclr_cli.allocator, "keep_freed_memory", record)
    return calls


def test_our_engine_path_measures_and_records_everything(
    bench: ModuleType,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    malloc_calls: list[str],
) -> None:
    # Every column of our side is a real, positive measurement, and the JSON says how it ran.
    out = tmp_path / "results.json"
    bench.main([*TINY, "--sides", "ours", "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    record = json.loads(out.read_text())

    job = record["jobs"][0]
    assert job["side"] == "ours" and job["pretrain_steps"] == 1 and job["images_per_step"] == 16
    assert job["embed_rows"] == 20  # simclr embed wrote one row per pretraining image
    for name in ("pretrain_images_per_s", "step_images_per_s", "embed_images_per_s",
                 "plain_embed_images_per_s", "peak_rss_mib"):  # fmt: skip
        assert job[name] > 0, name
    assert 0 <= job["knn_top1"] <= 1 and 0 <= job["probe_top1"] <= 1
    assert math.isfinite(job["final_loss"])
    # One in-run time per step, read back from the run's metrics.jsonl, inside the run's time.
    assert len(job["run_step_seconds"]) == job["pretrain_steps"]
    assert 0 < sum(job["run_step_seconds"]) < job["pretrain_seconds"]
    share = _row(record, "  share of the run in steps")["ours"]["values"][0]
    assert share == pytest.approx(sum(job["run_step_seconds"]) / job["pretrain_seconds"])
    assert _row(record, "  step in the run / model step")["ours"]["values"][0] > 0
    # Like the `simclr` command, our side keeps freed memory; the record says it did.
    assert malloc_calls == ["keep_freed_memory"] and job["freed_memory_kept"] is True

    bound = record["compute_bound"]
    # Only the precision in use is measured (TINY runs fp32), at --matmul-size at most.
    assert set(bound["matmul_gflops"]) == {"fp32"} and bound["matmul_gflops"]["fp32"] > 0
    assert bound["matmul_size"] == {"fp32": 128}
    flops = bound["flops_per_image"]
    # Two views, forward and backward (about twice the forward), against one forward.
    assert 5.5 < flops["train"] / flops["embed"] < 6.5
    assert _row(record, "pretrain end to end")["ours_fraction_of_bound"] > 0
    assert _row(record, "embed (theirs: plain PIL+torchvision)")["ratio"] > 0

    machine = record["machine"]
    assert machine["versions"]["torch"] and machine["torch_num_threads"] >= 1
    assert record["settings"]["images"] == 20 and record["settings"]["eval_images"] == 10

    printed = capsys.readouterr().out
    assert "pretrain end to end" in printed and "ours/lightly" in printed
    assert "malloc: ours keeps freed memory" in printed


def test_lightly_half_runs_when_lightly_is_installed(
    bench: ModuleType, tmp_path: Path, malloc_calls: list[str]
) -> None:
    # The other half of the comparison, only where the optional `bench` extra is installed.
    pytest.importorskip("lightly")
    out = tmp_path / "results.json"
    bench.main([*TINY, "--sides", "lightly", "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    job = json.loads(out.read_text())["jobs"][0]
    # lightly as shipped: glibc's malloc settings untouched unless --lightly-allocator kept.
    assert malloc_calls == [] and job["freed_memory_kept"] is False
    assert job["side"] == "lightly" and job["pretrain_steps"] == 1
    assert job["pretrain_images_per_s"] > 0 and job["step_images_per_s"] > 0
    assert 0 <= job["knn_top1"] <= 1


def test_batch_larger_than_the_images_is_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--images", "10", "--batch-size", "32"])


def test_by_default_each_tool_runs_at_its_own_precision(bench: ModuleType) -> None:
    # Ours as `simclr pretrain` ships (auto), lightly's loop as it ships (fp32, no autocast);
    # an explicit --precision still applies to both sides unless lightly's is given too.
    default = bench.parse_args([])
    assert (default.precision, default.lightly_precision) == ("auto", "fp32")
    both = bench.parse_args(["--precision", "bf16"])
    assert (both.precision, both.lightly_precision) == ("bf16", None)
    mixed = bench.parse_args(["--precision", "fp32", "--lightly-precision", "bf16"])
    assert (mixed.precision, mixed.lightly_precision) == ("fp32", "bf16")


def test_the_headline_says_which_bound_each_side_is_read_against(bench: ModuleType) -> None:
    bound = {"matmul_gflops": {"bf16": 2000.0, "fp32": 400.0}, "flops_per_image": {"train": 8e9}}
    mixed = {"precision": "bf16", "lightly_precision": "fp32"}
    assert bench._bound_columns(mixed, bound) == (
        "the bound column is ours (bf16); 'theirs % bound' is against lightly's fp32 bound, "
        "50.0 img/s for training\n"
    )
    assert bench._bound_columns({"precision": "fp32", "lightly_precision": "fp32"}, bound) == ""
