"""Time the training view pipeline (two views of a batch, as the encoder's input) on real photos.

    python benchmarks/augment_speed.py --sizes 32 96 224 --against 1ed6479

Crops of scikit-image's photos are resized into uint8 canvases of twice the training size
(what the loader hands to the pipeline), and the training step's input is made from a batch
of them: `make_view_batch`, or, at revisions before it existed, `make_views` followed by the
concatenation and channels-last copy the step then made. Reported: the median and the
fastest of `--repeats` calls after two untimed ones. With `--against REV`,
the pipeline as it was at that git revision (`src/simclr_cli/data/augment.py` read with
`git show`) is timed in the same process, call for call in turns, so both see the same
machine load. The numbers are milliseconds of wall time with torch's default threads
(`--threads N` to change); the load average is printed before and after, since on a shared
machine other work can move these timings by several times.

With `--step`, each size also times a whole training step (forward, backward and optimiser
of a ResNet-18, channels-last, under the precision `auto` picks, as `simclr pretrain` does)
three ways in turns: on an input made beforehand ("ready"), and with the views made in line
by each version, as a run makes them. The views' share of a step in the run is then read in
one process at one moment, where timing the run and the model step separately compares two
moments of a machine whose speed moves. Freed memory is kept in the
process as the `simclr` command keeps it (simclr_cli.allocator), so fresh buffers cost what
they cost in a run; `--glibc-default` leaves malloc as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torchvision.transforms.v2.functional as TF
from skimage import data as skdata

from simclr_cli.allocator import keep_freed_memory
from simclr_cli.config import AugmentConfig
from simclr_cli.data import augment

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def photo_canvases(batch: int, canvas: int) -> torch.Tensor:
    """`batch` different square crops of real photos as uint8 (batch, 3, canvas, canvas)."""
    photos = [torch.from_numpy(getattr(skdata, name)()).permute(2, 0, 1) for name in PHOTOS]
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        side = min(photo.shape[1:]) * 3 // 4
        top = (i * 7) % (photo.shape[1] - side + 1)
        left = (i * 13) % (photo.shape[2] - side + 1)
        crop = photo[:, top : top + side, left : left + side]
        crops.append(TF.resize(crop, [canvas, canvas], antialias=True))
    return torch.stack(crops)


def module_at(revision: str, work: Path) -> ModuleType:
    """The augmentation module as committed at `revision`, imported under another name."""
    source = subprocess.run(
        ["git", "show", f"{revision}:src/simclr_cli/data/augment.py"],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = work / "augment_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("augment_at_revision", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def encoder_input(
    module: ModuleType,
    canvases: torch.Tensor,
    sizes: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Both views stacked channels-last, (2B, 3, S, S), the way that version's step made it."""
    if hasattr(module, "make_view_batch"):
        return module.make_view_batch(canvases, sizes, config, generator)
    view_a, view_b = module.make_views(canvases, sizes, config, generator)
    return torch.cat([view_a, view_b]).contiguous(memory_format=torch.channels_last)


def step_timer(
    size: int, batch_size: int, precision_name: str = "auto"
) -> tuple[Callable[[torch.Tensor], None], str]:
    """A training step of a fresh ResNet-18 SimCLR model, and the precision it runs in.

    The step takes a (2B, 3, S, S) input; the precision is `precision_name` as
    `simclr pretrain --precision` resolves it on this CPU (`auto`: what training picks).
    """
    from simclr_cli.config import ModelConfig, OptimConfig, resolved_lr
    from simclr_cli.device import autocast, resolve_precision
    from simclr_cli.loss import nt_xent_loss
    from simclr_cli.models.simclr import build_model
    from simclr_cli.optim import build_optimizer

    device = torch.device("cpu")
    precision = resolve_precision(precision_name, device, training=True)
    torch.manual_seed(0)
    model = build_model(ModelConfig(), image_size=size).to(memory_format=torch.channels_last)
    optim_config = OptimConfig()
    optimizer = build_optimizer(
        model.train(), optim_config, lr=resolved_lr(optim_config, batch_size)
    )

    def step(images: torch.Tensor) -> None:
        with autocast(device, precision):
            projections = model(images)
        half = images.shape[0] // 2
        loss = nt_xent_loss(projections[:half], projections[half:], 0.5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, precision.name


def main(argv: list[str] | None = None) -> None:
    """Time each size, this code and the --against revision in turns."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 96, 224])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--against", help="a git revision to time in turns with this code")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--step",
        action="store_true",
        help="also time a training step on ready input and with each version's views in line",
    )
    add_glibc_default_option(parser)
    args = parser.parse_args(argv)
    kept = keep_freed_memory_unless(args.glibc_default)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        versions = {"this code": augment}
        if args.against:
            versions[args.against] = module_at(args.against, Path(tmp))
        print(f"two views of {args.batch_size} images, stacked channels-last; torch threads "
              f"{torch.get_num_threads()}; freed memory kept: {'yes' if kept else 'no'}; "
              f"ms: median (fastest) of {args.repeats}")  # fmt: skip
        print(load_line("load average at start"))
        for size in args.sizes:
            config = AugmentConfig(image_size=size)
            canvases = photo_canvases(args.batch_size, 2 * size)
            sizes = torch.full((args.batch_size, 2), 2 * size)
            times: dict[str, list[float]] = {name: [] for name in versions}
            for repeat in range(args.repeats + 2):
                for name, module in versions.items():
                    generator = torch.Generator().manual_seed(repeat)
                    started = time.perf_counter()
                    encoder_input(module, canvases, sizes, config, generator)
                    if repeat >= 2:
                        times[name].append(time.perf_counter() - started)
            cells = [
                f"{name} {1000 * statistics.median(t):.1f} ({1000 * min(t):.1f})"
                for name, t in times.items()
            ]
            print(f"{size:4d} px: " + " | ".join(cells), flush=True)
            if args.step:
                _time_steps(versions, canvases, sizes, config, args.repeats)
        print(load_line("load average at end", own_threads=torch.get_num_threads()))


def _time_steps(
    versions: dict[str, ModuleType],
    canvases: torch.Tensor,
    sizes: torch.Tensor,
    config: AugmentConfig,
    repeats: int,
) -> None:
    """Print the step on ready input and with each version's views made in line, in turns."""
    step, precision = step_timer(config.image_size, len(canvases))
    ready = encoder_input(augment, canvases, sizes, config, torch.Generator().manual_seed(0))
    arms: dict[str, Callable[[torch.Generator], torch.Tensor]] = {"ready": lambda _: ready}
    for name, module in versions.items():
        arms[f"views by {name}"] = partial(encoder_input, module, canvases, sizes, config)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(repeats + 2):  # the first steps pick kernels and allocate
        for name, make_input in arms.items():
            generator = torch.Generator().manual_seed(repeat)
            started = time.perf_counter()
            step(make_input(generator))
            if repeat >= 2:
                times[name].append(time.perf_counter() - started)
    print(f"      training step ({precision}), ms: median of {repeats}")
    ready_median = statistics.median(times["ready"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"      {name}: {1000 * median:.0f}, ready / this {ready_median / median:.3f}")


def add_glibc_default_option(parser: argparse.ArgumentParser) -> None:
    """`--glibc-default`, shared by the timing scripts: leave malloc as glibc ships it."""
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's malloc settings alone (default: keep freed memory, as `simclr` does)",
    )


def keep_freed_memory_unless(glibc_default: bool) -> bool:
    """Keep freed memory as the `simclr` command does, unless asked not to; True if kept."""
    return False if glibc_default else keep_freed_memory()


def load_line(label: str, own_threads: int = 0) -> str:
    """The 1-minute load average against the core count: other work skews every timing.

    `own_threads` are this script's busy threads, which a load average taken at the end of
    a run still counts (2.0 on 2 cores with nothing else running); work beyond them is
    flagged once it exceeds the cores they leave free, or half a core where they use all.
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    others = load - own_threads
    note = ""
    if others > max(cores - own_threads, 0.5):
        note = " (other work is running: timings are not comparable)"
    return f"{label}: {load:.1f} on {cores} cores{note}"


if __name__ == "__main__":
    sys.exit(main())
