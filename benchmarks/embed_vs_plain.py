"""`simclr embed` against a plain per-image PIL + torchvision pipeline, same encoder, same files.

The embedding half of bench_vs_lightly.py's photo configuration, on its own so that it runs
in a minute or two: 3,000 JPEG crops of scikit-image's photos (shorter side 128-320 px) at
96 px through a ResNet-18 with the standard stem. For each precision it times, in turns,
the plain pipeline (torchvision ImageFolder, Resize + CenterCrop + ToTensor + Normalize,
DataLoader) and `embed_folder` (our loader, batch norm folded), then the encoder alone on
ready batches with and without folding, and the matmul rate that bounds it.

Like the `simclr` command, the script first makes glibc keep freed memory
(simclr_cli.allocator); both pipelines run in this one process, so the plain one gets it
too. `SIMCLR_MALLOC=default python benchmarks/embed_vs_plain.py` measures both without it.

    python benchmarks/embed_vs_plain.py --out benchmarks/results/embed-photos.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_lightly import (  # noqa: E402
    PHOTO_NAMES,
    count_images,
    matmul_gflops,
    model_flops,
    plain_features,
    prepare_photos,
)

from simclr_cli.allocator import keep_freed_memory  # noqa: E402
from simclr_cli.config import AugmentConfig, ModelConfig, RunConfig  # noqa: E402
from simclr_cli.device import autocast, resolve_precision  # noqa: E402
from simclr_cli.engine.embed import EmbedOptions, embed_folder  # noqa: E402
from simclr_cli.engine.pretrain import initial_model  # noqa: E402
from simclr_cli.models.backbone import folded_for_inference  # noqa: E402
from simclr_cli.models.export import load_model  # noqa: E402


def _exported_random_model(folder: Path, image_size: int) -> Path:
    """A randomly initialised ResNet-18 (standard stem above 64 px), saved like a run."""
    from simclr_cli.checkpoint import save_exported_model
    from simclr_cli.models.export import export_config

    config = RunConfig(augment=AugmentConfig(image_size=image_size), model=ModelConfig())
    model = initial_model(config)
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    save_exported_model(folder, state, export_config(config, {}))
    return folder


def _encoder_rate(
    backbone: torch.nn.Module, image_size: int, batch_size: int, precision: str, repeats: int
) -> float:
    """Images/s of the encoder alone on a ready channels-last batch (best of `repeats`)."""
    device = torch.device("cpu")
    images = torch.randn(batch_size, 3, image_size, image_size)
    images = images.contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.inference_mode(), autocast(device, resolve_precision(precision, device)):
        backbone(images)
        for _ in range(repeats):
            started = time.perf_counter()
            backbone(images)
            best = min(best, time.perf_counter() - started)
    return batch_size / best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; print a table and return (and optionally write) the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--images",
        type=int,
        default=3000,
        help=f"photo crops to make: at least {len(PHOTO_NAMES)}, one per source photo; rounded "
        "down to whole crops per source photo",
    )
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="decoding workers, both sides")
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per pipeline")
    parser.add_argument("--model", type=Path, help="default: a random ResNet-18")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="kept; a complete set of photos already in it is reused (--images ignored)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.images < len(PHOTO_NAMES):
        parser.error(f"--images must be at least {len(PHOTO_NAMES)}: one crop per source photo")
    freed_memory_kept = keep_freed_memory()
    precisions = args.precision or ["fp32", "bf16"]
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="embed-bench-"))
    train_dir = work / "photos" / "train"
    # Written once every crop is saved: a folder without it is what an interrupted first run
    # leaves, and would be timed at a partial count.
    complete = work / "photos" / ".complete"
    reused = complete.is_file()
    if not reused:
        if (work / "photos").exists():
            sys.exit(
                f"{work / 'photos'} exists but is not a complete set made by this script "
                "(a first run stopped early?): remove it or choose another --work-dir"
            )
        prepare_photos(work / "photos", images=args.images, eval_images=0)
        complete.touch()
    count = count_images(train_dir)
    if reused:
        print(f"reusing the {count} photos already in {train_dir} (--images is ignored)")
    model_path = args.model or _exported_random_model(work / "model", args.image_size)
    model = load_model(model_path)
    cpu = torch.device("cpu")
    flops = model_flops(model.backbone.arch, args.image_size, model.backbone.small_stem, cpu)
    record: dict[str, Any] = {
        "images": count,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "model": str(args.model or "random resnet18"),
        "embed_gflop_per_image": flops["embed"] / 1e9,
        "freed_memory_kept": freed_memory_kept,
        "results": {},
    }
    for precision in precisions:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak = matmul_gflops(2048, dtype, cpu)["gflops"]
        plain, ours = [], []
        for turn in range(args.repeats):
            _, _, seconds = plain_features(
                model.backbone,
                train_dir,
                image_size=args.image_size,
                batch_size=args.batch_size,
                workers=args.workers,
                device=cpu,
                precision=precision,
            )
            plain.append(count / seconds)
            options = EmbedOptions(
                device="cpu",
                precision=precision,
                batch_size=args.batch_size,
                num_workers=args.workers,
            )
            out = work / f"vecs-{precision}-{turn}.npy"
            started = time.perf_counter()
            embed_folder(train_dir, model_path, out, options=options)
            ours.append(count / (time.perf_counter() - started))
        unfolded = _encoder_rate(
            model.backbone.eval(), args.image_size, args.batch_size, precision, repeats=3
        )
        folded = _encoder_rate(
            folded_for_inference(model.backbone),
            args.image_size,
            args.batch_size,
            precision,
            repeats=3,
        )
        bound = peak * 1e9 / flops["embed"]
        record["results"][precision] = {
            "plain_images_per_s": plain,
            "ours_images_per_s": ours,
            "ratio_median": float(np.median(ours) / np.median(plain)),
            "encoder_only_images_per_s": unfolded,
            "encoder_only_folded_images_per_s": folded,
            "matmul_gflops": peak,
            "bound_images_per_s": bound,
            "ours_fraction_of_bound": float(np.median(ours) / bound),
        }
    print(
        f"{count} photos at {args.image_size} px, batch {args.batch_size}, "
        f"{args.workers} worker(s), {record['threads']} threads, "
        f"malloc {'keeps freed memory' if freed_memory_kept else 'glibc default'}"
    )
    print(
        "| precision | plain img/s | simclr embed img/s | ratio | encoder alone (folded) "
        "| bound | embed / bound |"
    )
    print("|---|---|---|---|---|---|---|")
    for precision, r in record["results"].items():
        plain_text = " / ".join(f"{v:.0f}" for v in r["plain_images_per_s"])
        ours_text = " / ".join(f"{v:.0f}" for v in r["ours_images_per_s"])
        print(
            f"| {precision} | {plain_text} | {ours_text} | {r['ratio_median']:.2f}x "
            f"| {r['encoder_only_images_per_s']:.0f} ({r['encoder_only_folded_images_per_s']:.0f}) "
            f"| {r['bound_images_per_s']:.0f} | {r['ours_fraction_of_bound']:.0%} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


if __name__ == "__main__":
    main()
