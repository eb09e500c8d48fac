"""The model step with and without keeping freed memory (simclr_cli.allocator), in turns.

Each measurement is a fresh interpreter that builds the engine's ResNet-18 + projection head
(channels-last, LARS, NT-Xent in fp32, as in engine/pretrain.py; `--precision bf16`
autocasts the model as the engine does) and times `--steps` training steps on one ready
batch of random views, with the minor page faults and kernel CPU time of each step and the
interpreter's peak resident memory. One interpreter keeps freed memory, as the `simclr`
command does; the other runs with `SIMCLR_MALLOC=default` (glibc as shipped). The first
step of each is left out of the medians: it maps the memory either way.

    python benchmarks/malloc_step.py --sizes 32 96 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

_CHILD = """
import json, resource, sys, time
import torch
from simclr_cli.allocator import keep_freed_memory
from simclr_cli.config import ModelConfig, OptimConfig, resolved_lr
from simclr_cli.loss import nt_xent_loss
from simclr_cli.models.simclr import build_model
from simclr_cli.optim import build_optimizer

kept = keep_freed_memory()
size, steps, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
bf16 = sys.argv[4] == "bf16"
torch.manual_seed(0)
model_config = ModelConfig(arch="resnet18", small_stem=size <= 64)
model = build_model(model_config, image_size=size).to(memory_format=torch.channels_last).train()
optim_config = OptimConfig(optimizer="lars")
optimizer = build_optimizer(model, optim_config, lr=resolved_lr(optim_config, batch))
views = torch.randn(2 * batch, 3, size, size).contiguous(memory_format=torch.channels_last)
rows = []
for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        projections = model(views)
    projections = projections.float()  # the loss in fp32, as the engine does
    loss = nt_xent_loss(projections[:batch], projections[batch:], 0.5)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    rows.append({"seconds": seconds, "minor_faults": after.ru_minflt - before.ru_minflt,
                 "system_s": after.ru_stime - before.ru_stime})
print(json.dumps({"kept": kept, "steps": rows,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _measure(size: int, steps: int, batch: int, precision: str, *, keep: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("SIMCLR_MALLOC", None)
    if not keep:
        env["SIMCLR_MALLOC"] = "default"
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(size), str(steps), str(batch), precision],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure each size in turns, print a table, optionally write the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96])
    parser.add_argument("--steps", type=int, default=5, help="per interpreter, first untimed")
    parser.add_argument("--batch-size", type=int, default=256, help="images (two views each)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast model"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interpreter pairs per size")
    parser.add_argument("--out", help="write the record as JSON here")
    args = parser.parse_args(argv)
    record: dict[str, Any] = {
        "batch_size": args.batch_size,
        "precision": args.precision,
        "loadavg_start": os.getloadavg(),
    }
    print(
        "| size | malloc | step s (median) | minor faults / step | kernel CPU s / step "
        "| peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        runs: dict[str, list[dict[str, Any]]] = {"glibc default": [], "keeps freed memory": []}
        for _ in range(args.rounds):
            runs["glibc default"].append(
                _measure(size, args.steps, args.batch_size, args.precision, keep=False)
            )
            runs["keeps freed memory"].append(
                _measure(size, args.steps, args.batch_size, args.precision, keep=True)
            )
        record[str(size)] = runs
        for name, results in runs.items():
            later = [step for result in results for step in result["steps"][1:]]
            peaks = " / ".join(f"{result['peak_rss_mib']:,.0f}" for result in results)
            print(
                f"| {size} px | {name} | {statistics.median(s['seconds'] for s in later):.2f} "
                f"| {statistics.median(s['minor_faults'] for s in later):,.0f} "
                f"| {statistics.median(s['system_s'] for s in later):.2f} "
                f"| {peaks} |"
            )
    record["loadavg_end"] = os.getloadavg()
    print(f"load average {record['loadavg_start'][0]:.1f} -> {record['loadavg_end'][0]:.1f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
    return record


if __name__ == "__main__":
    main()
