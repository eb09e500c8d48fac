"""Convolution weight gradients: oneDNN's kernel against one matrix product, per ResNet layer.

For every convolution of the chosen backbones at the chosen image sizes (shapes taken from
a real forward pass), this times the weight gradient two ways on the same tensors:
oneDNN's (`aten.convolution_backward`, what autograd calls) and
`simclr_cli.models.small_map_conv.weight_grad_by_matmul`, in each precision asked for.
The table marks the layers the engine sends down the matrix-product path
(`SMALL_MAP_POSITIONS`), so the rule can be checked against the timings on any CPU.
`--step` also times a whole SimCLR training step (ResNet-18, batch 256 images, the
precision `auto` picks) with the small-map path on and off, in turns.

    python benchmarks/conv_weight_grad.py --out benchmarks/results/conv-weight-grad.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_speed import (  # noqa: E402
    add_glibc_default_option,
    keep_freed_memory_unless,
    load_line,
)
from bench_vs_lightly import cpu_model  # noqa: E402

from simclr_cli.models import backbone as backbone_module  # noqa: E402
from simclr_cli.models.backbone import Backbone  # noqa: E402
from simclr_cli.models.small_map_conv import (  # noqa: E402
    SMALL_MAP_POSITIONS,
    weight_grad_by_matmul,
)


def conv_shapes(arch: str, image_size: int, small_stem: bool, batch: int) -> list[dict[str, Any]]:
    """Each distinct convolution of the backbone: input shape, kernel, stride, padding, output."""
    model = Backbone(arch, small_stem=small_stem).eval()
    found: dict[tuple[Any, ...], dict[str, Any]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, nn.Conv2d)
        key = (tuple(inputs[0].shape[1:]), tuple(module.weight.shape), module.stride)
        entry = found.setdefault(
            key,
            {
                "input": [batch, *inputs[0].shape[1:]],
                "weight": list(module.weight.shape),
                "stride": list(module.stride),
                "padding": list(module.padding),  # type: ignore[arg-type]
                "output": [batch, *output.shape[1:]],
                "count": 0,
            },
        )
        entry["count"] += 1

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(record)
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return list(found.values())


def _best_ms(run: Callable[[], Any], repeats: int) -> float:
    run()
    run()  # the first calls pick kernels and allocate
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def time_layer(shape: dict[str, Any], dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Milliseconds for one weight gradient both ways, and how far apart the results are."""
    generator = torch.Generator().manual_seed(0)
    channels_last = torch.channels_last
    inputs = torch.randn(shape["input"], generator=generator).to(dtype)
    inputs = inputs.contiguous(memory_format=channels_last)
    weight = torch.randn(shape["weight"], generator=generator).to(dtype)
    weight = weight.contiguous(memory_format=channels_last)
    grad = torch.randn(shape["output"], generator=generator).to(dtype)
    grad = grad.contiguous(memory_format=channels_last)
    stride, padding = tuple(shape["stride"]), tuple(shape["padding"])

    def onednn() -> torch.Tensor:
        return torch.ops.aten.convolution_backward(
            grad, inputs, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [False, True, False],
        )[1]  # fmt: skip

    def matmul() -> torch.Tensor:
        return weight_grad_by_matmul(grad, inputs, tuple(weight.shape[2:]), stride, padding)

    reference = onednn().float()
    difference = (matmul().float() - reference).abs().max() / reference.abs().max()
    return {
        "onednn_ms": _best_ms(onednn, repeats),
        "matmul_ms": _best_ms(matmul, repeats),
        "max_difference_relative": float(difference),
    }


def time_steps(image_size: int, repeats: int, batch: int = 256) -> dict[str, Any]:
    """A ResNet-18 training step of `batch` images with the small-map path on and off (ms)."""
    from augment_speed import encoder_input, photo_canvases, step_timer

    from simclr_cli.config import AugmentConfig
    from simclr_cli.data import augment

    config = AugmentConfig(image_size=image_size)
    canvases = photo_canvases(batch, 2 * image_size)
    sizes = torch.full((batch, 2), 2 * image_size)
    ready = encoder_input(augment, canvases, sizes, config, torch.Generator().manual_seed(0))
    with_path, precision = step_timer(image_size, batch)
    turn_on = backbone_module.use_small_map_convs
    backbone_module.use_small_map_convs = lambda module: 0  # build one model without it
    try:
        without_path, _ = step_timer(image_size, batch)
    finally:
        backbone_module.use_small_map_convs = turn_on
    arms = {"oneDNN weight gradients": without_path, "small-map path": with_path}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats + 1):
        for name, step in arms.items():
            started = time.perf_counter()
            step(ready)
            if repeat:  # the first step picks kernels and allocates
                times[name].append(1000 * (time.perf_counter() - started))
    return {"precision": precision, "ms": times}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time every layer (and optionally whole steps), print the table, return the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["32s", "96"],
        help="image sides; a trailing s means the small-image stem",
    )
    parser.add_argument("--batch", type=int, default=512, help="images per gradient (2 views)")
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--step", type=int, nargs="*", help="also time training steps at these px")
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--step-batch", type=int, default=256, help="images per timed step")
    add_glibc_default_option(parser)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    kept = keep_freed_memory_unless(args.glibc_default)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    record: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
        "processor": cpu_model() or platform.processor(),
        "small_map_positions": SMALL_MAP_POSITIONS,
        "batch": args.batch,
        "freed_memory_kept": kept,
        "layers": [],
    }
    print(f"weight gradient of one layer, ms (best of {args.repeats}); batch {args.batch}; torch "
          f"threads {torch.get_num_threads()}; (xN): layers of that shape; diff: largest "
          f"difference / largest entry; * = the engine uses the matrix product")  # fmt: skip
    print(load_line("load average at start"))
    record["load_average_at_start"] = os.getloadavg()[0]
    for arch in args.arch:
        for size_text in args.sizes:
            small_stem = size_text.endswith("s")
            size = int(size_text.rstrip("s"))
            for shape in conv_shapes(arch, size, small_stem, args.batch):
                positions = shape["output"][2] * shape["output"][3]
                used = positions <= SMALL_MAP_POSITIONS
                for name in args.precision:
                    timing = time_layer(shape, dtypes[name], args.repeats)
                    entry = {"arch": arch, "image_size": size, "small_stem": small_stem,
                             "precision": name, "used": used and name == "bf16", **shape,
                             **timing}  # fmt: skip
                    record["layers"].append(entry)
                    k_h, k_w = shape["weight"][2:]
                    print(
                        f"{arch} {size_text:>4} {name} {shape['weight'][1]:>4}->"
                        f"{shape['weight'][0]:<4} k{k_h}x{k_w} s{shape['stride'][0]} out "
                        f"{shape['output'][2]}x{shape['output'][3]} (x{shape['count']}): "
                        f"oneDNN {timing['onednn_ms']:7.1f}  matmul {timing['matmul_ms']:7.1f}  "
                        f"{timing['onednn_ms'] / timing['matmul_ms']:5.2f}x  "
                        f"diff {timing['max_difference_relative']:.1e}"
                        f"{' *' if entry['used'] else ''}",
                        flush=True,
                    )
    for size in args.step or []:
        result = time_steps(size, args.step_repeats, args.step_batch)
        medians = {name: statistics.median(ms) for name, ms in result["ms"].items()}
        before, after = medians["oneDNN weight gradients"], medians["small-map path"]
        print(f"training step of {args.step_batch} images at {size} px ({result['precision']}), "
              f"ms, median of "
              f"{args.step_repeats}: oneDNN {before:.0f}, small-map path {after:.0f}, "
              f"{before / after:.3f}x")  # fmt: skip
        record.setdefault("steps", {})[str(size)] = result
    print(load_line("load average at end", own_threads=torch.get_num_threads()))
    record["load_average_at_end"] = os.getloadavg()[0]
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


if __name__ == "__main__":
    main()
