"""fp32 against bf16 for a SimCLR training step on this CPU, and what `auto` picks here.

    python benchmarks/precision_step.py --out benchmarks/results/precision-step.json

`simclr pretrain --precision auto` trains in bf16 on CPUs whose torch reports native bf16
arithmetic (AVX512-BF16 or AMX) and in fp32 elsewhere (simclr_cli.device). This script
checks that choice on the machine it runs on: it measures the fp32 and bf16 matrix-product
rates (the bound each precision could reach), then times a whole training step (ResNet-18,
channels-last, two views of `--batch` real photo crops, the NT-Xent loss in fp32, LARS)
in fp32 and in bf16, the two models in turns in one process so both see the same machine
load. The first step of each model is untimed (kernel choice and allocation). Freed memory
is kept as the `simclr` command keeps it. The line per size gives the median step in each
precision and bf16's speed-up; the last line says whether `auto`'s choice was the faster one
at every size timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_speed import (  # noqa: E402
    add_glibc_default_option,
    encoder_input,
    keep_freed_memory_unless,
    load_line,
    photo_canvases,
    step_timer,
)
from bench_vs_lightly import cpu_model, matmul_gflops  # noqa: E402

from simclr_cli.config import AugmentConfig  # noqa: E402
from simclr_cli.data import augment  # noqa: E402
from simclr_cli.device import cpu_bf16_probes, resolve_precision  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def time_sizes(sizes: list[int], batch: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Milliseconds per step, by size and precision, the precisions in turns."""
    results: dict[str, dict[str, list[float]]] = {}
    for size in sizes:
        config = AugmentConfig(image_size=size)
        canvases = photo_canvases(batch, 2 * size)
        canvas_sizes = torch.full((batch, 2), 2 * size)
        generator = torch.Generator().manual_seed(0)
        ready = encoder_input(augment, canvases, canvas_sizes, config, generator)
        steps = {name: step_timer(size, batch, name)[0] for name in PRECISIONS}
        times: dict[str, list[float]] = {name: [] for name in PRECISIONS}
        for repeat in range(repeats + 1):
            for name, step in steps.items():
                started = time.perf_counter()
                step(ready)
                if repeat:
                    times[name].append(1000 * (time.perf_counter() - started))
        results[str(size)] = times
        fp32, bf16 = (statistics.median(times[name]) for name in PRECISIONS)
        print(f"training step of {batch} images at {size} px, ms, median of {repeats}: "
              f"fp32 {fp32:.0f}, bf16 {bf16:.0f}: bf16 {fp32 / bf16:.2f}x "
              f"({1000 * batch / fp32:.1f} and {1000 * batch / bf16:.1f} images/s)",
              flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time both precisions at each size, print the lines, return (and write) the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--batch", type=int, default=256, help="images per step (2 views)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-side", type=int, default=2048, help="largest product side")
    add_glibc_default_option(parser)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    kept = keep_freed_memory_unless(args.glibc_default)
    cpu = torch.device("cpu")
    probes = cpu_bf16_probes()
    auto = resolve_precision("auto", cpu, training=True).name
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; probes {probes}; "
          f"`auto` trains in {auto} here")  # fmt: skip
    print(load_line("load average at start"))
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        # platform.processor() is often empty on Linux; /proc/cpuinfo names the model.
        "cpu_model": cpu_model() or platform.processor(),
        "probes": probes,
        "auto": auto,
        "batch": args.batch,
        "freed_memory_kept": kept,
        "load_average_at_start": os.getloadavg()[0],
        "matmul_gflops": {},
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rate = matmul_gflops(args.matmul_side, dtype, cpu)
        record["matmul_gflops"][name] = rate
        print(f"matmul {name}: {rate['gflops']:.0f} GFLOP/s (side {rate['side']})", flush=True)
    record["steps_ms"] = time_sizes(args.sizes, args.batch, args.repeats)
    faster = {
        size: min(PRECISIONS, key=lambda name: statistics.median(times[name]))
        for size, times in record["steps_ms"].items()
    }
    record["faster"] = faster
    agrees = all(name == auto for name in faster.values())
    print(f"`auto` ({auto}) was the faster precision at "
          f"{'every size' if agrees else 'not every size'} timed: {faster}")  # fmt: skip
    print(load_line("load average at end", own_threads=torch.get_num_threads()))
    record["load_average_at_end"] = os.getloadavg()[0]
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


if __name__ == "__main__":
    main()
