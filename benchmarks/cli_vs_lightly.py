"""`simclr pretrain` and `simclr embed` against lightly's own commands, timed from the shell.

bench_vs_lightly.py compares the two engines inside Python. This script times the two
command-line tools as a user would with `time`: each command runs as its own process, so
the interpreter's start, the imports, decoding, checkpoints and every file written count.

    simclr pretrain DATA ...    then    simclr embed DATA --model RUN ...
    lightly-ssl-train ...       then    lightly-embed checkpoint=CKPT ...

The data is data bench_vs_lightly.py does not use, or any folder given with --data (a
folder with images both at its top and in sub-folders is refused: lightly's commands would
read only the sub-folders):
- `--dataset digits` (default, 32 px): scikit-learn's 1,797 handwritten 8x8 digits (the UCI
  optical digits test set, in the package), written as PNG files.
- `--dataset photos` (64 px): 768 JPEG crops (shorter side 128-320 px) of six packaged
  photos that bench_vs_lightly.py does not use: scikit-learn's china and flower,
  scikit-image's cell, clock, microaneurysms and text (licences: docs/datasets.md).
The commands' output goes to the work folder (kept with --work-dir, or when a command
fails); the exact commands are printed before they run, to be repeated by hand. The
`simclr` and lightly commands timed are those installed beside this script's Python, or
else the first on PATH.

What both commands share: image size, batch size, epochs, the network (lightly's command
builds only its CIFAR-style ResNet-18, a 3x3 stride-1 stem without max-pool, at every size,
so ours is given `--small-stem`, its default at 64 px and below; at 96 px that stem costs
about 15 times the arithmetic of the standard one), 512-wide features (lightly's command
otherwise narrows them to 32 with a 1x1 convolution; at 512 that convolution stays, under
1% of the arithmetic at 32 px), a 128-wide projection, and the view recipe (lightly's
command is given our crop scale, jitter strengths and blur probability: the same work per
view). Each keeps its own defaults otherwise, as a user running it would meet them:
precision (ours `auto`: bf16 on CPUs with AMX or AVX512-BF16; lightly's trainer fp32 unless
--lightly-precision bf16), loader workers (ours: the spare cores; lightly: every core),
optimiser (ours LARS; lightly's command plain SGD at lr 1.0), progress output and files.
lightly's command is told `pre_trained=False`, so it downloads nothing.

Images per second are images trained or embedded, over the command's wall time. Images
trained are each tool's own: simclr's steps x batch from its metrics.jsonl; for lightly,
epochs x full batches (it drops the last partial one, as simclr does) of the images its
embedding read. A warning says when the two tools read different numbers of images
(simclr skips unreadable files; lightly stops at one). A kNN top-1 (k = 20,
cosine, weighted votes) on each tool's embedding of the same files, labels from the file
names (a digit's `NNNN-<digit>.png`) or else from the parent folder, shows that
both learnt something comparable; one seed, so read it loosely.

    python benchmarks/cli_vs_lightly.py --out benchmarks/results/cli-digits8-zen4.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from augment_speed import load_line  # noqa: E402
from bench_vs_lightly import cpu_model, lightly_version, prepare_photos  # noqa: E402

from simclr_cli.config import AugmentConfig, blur_probability  # noqa: E402
from simclr_cli.data.images import IMAGE_EXTENSIONS  # noqa: E402
from simclr_cli.data.loader import cache_fill_workers, default_num_workers  # noqa: E402
from simclr_cli.engine.knn import knn_top1  # noqa: E402

SIDES = ("simclr", "lightly")
# Packaged photos that bench_vs_lightly.py's photo configuration leaves out.
OTHER_PHOTOS = ("china.jpg", "flower.jpg", "cell", "clock", "microaneurysms", "text")
DEFAULT_SIZE = {"digits": 32, "photos": 64}


def write_sklearn_digits(folder: Path) -> Path:
    """scikit-learn's 8x8 digits as grayscale PNG files named `NNNN-<digit>.png`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    # Pixel counts run 0..16 (on pixels per 4x4 block); stretched to 0..255.
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    for index, (image, digit) in enumerate(zip(pixels, digits.target, strict=True)):
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}-{digit}.png")
    return folder


def image_files(folder: Path) -> list[Path]:
    """Files under `folder` that `simclr` would read, recursively, in name order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def check_layout_for_lightly(data: Path, files: list[Path]) -> None:
    """Refuse a folder whose top holds images beside sub-folders of images.

    lightly's dataset reads such a folder as torchvision's ImageFolder does, sub-folders
    only, while `simclr` reads every file: the two would train on different images.
    """
    on_top = sum(1 for f in files if f.parent == data)
    if 0 < on_top < len(files):
        raise SystemExit(
            f"error: {data} has {on_top} images at its top and {len(files) - on_top} in "
            "sub-folders; lightly's commands would read only the sub-folders, so the tools "
            "would not train on the same images. Move the top-level images into a sub-folder."
        )


def label_of(path: Path, *, from_name: bool) -> str:
    """The class of a file: the digit in `NNNN-<digit>.png`, or its folder's name."""
    if from_name:
        match = re.fullmatch(r"\d+-(\d)", path.stem)
        return match.group(1) if match else ""
    return path.parent.name


def simclr_commands(
    args: argparse.Namespace, data: Path, work: Path
) -> tuple[list[str], list[str], Path]:
    """`simclr pretrain` and `simclr embed`, and where the embedding will be."""
    executable = _executable("simclr")
    run = work / "simclr-run"
    vectors = work / "simclr-vecs.npy"
    pretrain = [executable, "pretrain", str(data), "--out", str(run), "--epochs",
                str(args.epochs), "--batch-size", str(args.batch_size), "--image-size",
                str(args.image_size), "--small-stem", "--seed", "0"]  # fmt: skip
    embed = [executable, "embed", str(data), "--model", str(run), "-o", str(vectors)]
    if args.workers is not None:
        pretrain += ["--workers", str(args.workers)]
        embed += ["--workers", str(args.workers)]
    return pretrain, embed, vectors


def lightly_commands(
    args: argparse.Namespace, data: Path, work: Path
) -> tuple[list[str], list[str], Path]:
    """The two lightly commands (hydra overrides); embedding reads the training's `last.ckpt`."""
    ours = AugmentConfig(image_size=args.image_size)
    strength = ours.jitter_strength
    shared = [f"input_dir={_hydra_value(data)}", "pre_trained=False", "model.num_ftrs=512",
              "model.out_dim=128", f"collate.input_size={args.image_size}",
              f"loader.batch_size={args.batch_size}"]  # fmt: skip
    if args.workers is not None:
        shared.append(f"loader.num_workers={args.workers}")
    precision = {"fp32": "32", "bf16": "bf16-mixed"}[args.lightly_precision]
    train = [
        _executable("lightly-ssl-train"),
        *shared,
        f"trainer.max_epochs={args.epochs}",
        f"trainer.precision={precision}",
        "seed=0",
        f"collate.min_scale={ours.crop_area[0]}",
        f"collate.cj_prob={ours.jitter_prob}",
        f"collate.cj_bright={0.8 * strength}",
        f"collate.cj_contrast={0.8 * strength}",
        f"collate.cj_sat={0.8 * strength}",
        f"collate.cj_hue={0.2 * strength}",
        f"collate.random_gray_scale={ours.grayscale_prob}",
        f"collate.gaussian_blur={blur_probability(ours)}",
        f"collate.sigmas=[{ours.blur_sigma[0]},{ours.blur_sigma[1]}]",
        f"collate.hf_prob={ours.flip_prob}",
    ]
    checkpoint = work / "lightly" / "last.ckpt"
    embed = [_executable("lightly-embed"), *shared, f"checkpoint={_hydra_value(checkpoint)}"]
    return train, embed, work / "lightly" / "embeddings.csv"


def _hydra_value(path: Path) -> str:
    """A path as one hydra override value: quoted where hydra's grammar needs it."""
    text = str(path)
    if re.fullmatch(r"[\w/.\-]+", text):
        return text
    if "'" in text:
        raise SystemExit(f"error: lightly's command line cannot take a quote in {text}")
    return f"'{text}'"


def _executable(name: str) -> str:
    """The command installed beside this Python, else the first on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        hint = "pip install -e '.[bench]'" if name.startswith("lightly") else "pip install -e ."
        raise SystemExit(f"error: `{name}` is not on PATH ({hint})")
    return found


class CommandFailed(SystemExit):
    """A timed command exited with an error; the work folder is kept for its log."""


def timed(command: list[str], cwd: Path, log: Path) -> float:
    """Wall seconds of one command, its output to `log`; a failure stops the benchmark."""
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        started = time.perf_counter()
        result = subprocess.run(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise CommandFailed(
            f"error: {Path(command[0]).name} exited with {result.returncode}; "
            f"its output is in {log}; the last lines:\n" + "\n".join(tail)
        )
    return seconds


def simclr_rows(vectors: Path) -> tuple[np.ndarray, list[Path]]:
    """`simclr embed`'s array and the file of each row, from its manifest."""
    array = np.load(vectors)
    manifest = vectors.with_suffix(".manifest.csv")
    with manifest.open(newline="", encoding="utf-8") as handle:
        paths = [Path(row["path"]) for row in csv.DictReader(handle) if row["row"]]
    return array, paths


def lightly_rows(embeddings_csv: Path, data: Path) -> tuple[np.ndarray, list[Path]]:
    """`lightly-embed`'s embeddings.csv as an array, and the file of each row."""
    with embeddings_csv.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        columns = [i for i, name in enumerate(header) if name.startswith("embedding_")]
        paths, rows = [], []
        for row in reader:
            paths.append(data / row[0])
            rows.append([float(row[i]) for i in columns])
    return np.asarray(rows, dtype=np.float32), paths


def knn_of(array: np.ndarray, paths: list[Path], *, from_name: bool) -> float | None:
    """Top-1 of a kNN vote (%): every fifth file in name order asks, the others answer."""
    labels = [label_of(p, from_name=from_name) for p in paths]
    if "" in labels or len(set(labels)) < 2:
        return None
    order = sorted(range(len(paths)), key=lambda i: str(paths[i]))
    names = sorted(set(labels))
    index = torch.tensor([names.index(labels[i]) for i in order])
    features = torch.from_numpy(array[order])
    query = torch.arange(len(order)) % 5 == 0
    top1 = knn_top1(
        features[~query], index[~query], features[query], index[query], num_classes=len(names)
    )
    return 100.0 * float(top1)


def run_side(
    side: str, args: argparse.Namespace, data: Path, work: Path, *, show_commands: bool
) -> dict[str, Any]:
    """One tool's two commands, timed, and its embedding read back and scored."""
    work.mkdir(parents=True, exist_ok=True)
    if side == "simclr":
        pretrain, embed, vectors = simclr_commands(args, data, work)
        cwd = work
    else:
        pretrain, embed, vectors = lightly_commands(args, data, work)
        cwd = work / "lightly"  # lightly-ssl-train writes its checkpoints here
    if show_commands:
        if side == "lightly":
            print(f"  $ cd {shlex.quote(str(cwd))}")
        for command in (pretrain, embed):
            print(f"  $ {shlex.join(command)}")
    pretrain_s = timed(pretrain, cwd, work / f"{side}-pretrain.log")
    embed_s = timed(embed, cwd, work / f"{side}-embed.log")
    if side == "simclr":
        array, paths = simclr_rows(vectors)
    else:
        array, paths = lightly_rows(vectors, data)
    # Images each tool itself found: simclr's embedding skips unreadable files, and lightly's
    # embedding reads the folder with the same dataset class as its training.
    found = int(array.shape[0])
    facts = {}
    if side == "simclr":  # its run's own count: the steps it took
        facts = _simclr_run_facts(work / "simclr-run" / "metrics.jsonl", args)
        trained = facts["steps_x_batch"]
    else:  # full batches only, as its loader drops the last partial one
        trained = args.epochs * (found // args.batch_size) * args.batch_size
    result = {
        "pretrain_command": pretrain,
        "embed_command": embed,
        "pretrain_seconds": pretrain_s,
        "embed_seconds": embed_s,
        "images_trained": trained,
        "pretrain_images_per_s": trained / pretrain_s,
        "embedded_rows": found,
        "embed_images_per_s": array.shape[0] / embed_s,
        "feature_width": int(array.shape[1]),
        "knn_top1": knn_of(array, paths, from_name=args.data is None and args.dataset == "digits"),
    }
    return result | facts


def _simclr_run_facts(metrics: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Precision and steps from the run's own record: the images it trained are steps x batch."""
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    start = next(r for r in records if r["kind"] == "start")
    steps = max(r["step"] for r in records if r["kind"] == "step")
    return {
        "precision": start["precision"],
        "steps": steps,
        "steps_x_batch": steps * args.batch_size,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; the image size defaults per dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", choices=sorted(DEFAULT_SIZE), help="default: digits")
    source.add_argument("--data", type=Path, help="a folder of images instead of --dataset")
    parser.add_argument(
        "--images", type=int, default=768, help="photo crops for --dataset photos (768)"
    )
    parser.add_argument("--image-size", type=int, help="default: 32 for digits, 64 for photos")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, help="loader workers for both (default: each tool's own)"
    )
    parser.add_argument(
        "--lightly-precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="lightly's trainer precision (default fp32, what its command ships with)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds, the sides in turns")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="a new or empty folder, kept (default: a temporary folder, removed unless a "
        "command fails)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    args = parser.parse_args(argv)
    if args.data is None and args.dataset is None:
        args.dataset = "digits"
    if args.image_size is None:
        args.image_size = DEFAULT_SIZE[args.dataset or "photos"]
    if args.batch_size < 2:
        parser.error("--batch-size must be at least 2")
    if args.repeats < 1 or args.images < 1:
        parser.error("--repeats and --images must be at least 1")
    if args.data is not None and not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder")
    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        parser.error(f"--work-dir {args.work_dir} is not empty; give a new or empty folder")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the rounds; print the commands and the table, return (and write) the record."""
    args = parse_args(argv)
    if args.work_dir is not None:
        work = args.work_dir.resolve()
        work.mkdir(parents=True, exist_ok=True)
        return _benchmark(args, work)
    work = Path(tempfile.mkdtemp(prefix="simclr-cli-bench-"))
    try:
        record = _benchmark(args, work)
    except CommandFailed:
        print(f"work folder kept for the logs: {work}", file=sys.stderr)
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return record


def _benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The data, the rounds, the table and the record, in `work`."""
    if args.data is not None:
        data = args.data.resolve()
    elif args.dataset == "digits":
        data = write_sklearn_digits(work / "digits8" / "all").parent
    else:
        data, _ = prepare_photos(
            work / "photos", images=args.images, eval_images=0, names=OTHER_PHOTOS
        )
    files = image_files(data)
    if len(files) < args.batch_size:
        raise SystemExit(f"error: {len(files)} images in {data}, fewer than one batch")
    if "lightly" in args.sides:
        check_layout_for_lightly(data, files)
    print(f"{len(files)} image files in {data}; {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs; sides in turns, {args.repeats} round(s)")  # fmt: skip
    print(f"work folder: {work}")
    print(load_line("load average at start"))
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        for side in args.sides:
            result = run_side(
                side, args, data, work / f"round{repeat}" / side, show_commands=repeat == 0
            )
            rounds[side].append(result)
            print(f"round {repeat + 1} {side}: pretrain {result['pretrain_seconds']:.1f} s, "
                  f"embed {result['embed_seconds']:.1f} s")  # fmt: skip
        found = {side: rounds[side][-1]["embedded_rows"] for side in args.sides}
        if len(set(found.values())) > 1:
            print(f"warning: the tools read different numbers of images ({found}); their "
                  "rates count their own images, and the kNN scores differ in what they "
                  "cover")  # fmt: skip
    print(load_line("load average at end", own_threads=torch.get_num_threads()))
    record: dict[str, Any] = {
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightly": lightly_version(),
            **_versions(),
        },
        "settings": {
            "data": str(args.data) if args.data else args.dataset,
            "image_files": len(files),
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "workers": args.workers,
            "workers_each_by_default": {
                "simclr": {
                    "training": default_num_workers(),
                    "cache_fill": cache_fill_workers(None),
                },
                "lightly": os.cpu_count(),  # its command's num_workers=-1: every core
            },
            "lightly_precision": args.lightly_precision,
            "repeats": args.repeats,
        },
        "rounds": rounds,
        "summary": summary(rounds),
    }
    print(format_table(record["summary"], args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"record: {args.out}")
    return record


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    found: dict[str, str | None] = {}
    for name in ("simclr-cli", "pytorch-lightning", "hydra-core"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


METRICS = (
    ("pretrain_seconds", "pretrain command, s", False),
    ("pretrain_images_per_s", "  images trained / s", True),
    ("embed_seconds", "embed command, s", False),
    ("embed_images_per_s", "  images embedded / s", True),
    ("knn_top1", "kNN top-1 on its embedding, %", False),
)


def summary(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds per side, and simclr/lightly for the rates."""
    medians: dict[str, dict[str, float | None]] = {}
    for side, results in rounds.items():
        medians[side] = {}
        for key, _, _ in METRICS:
            values = [r[key] for r in results if r[key] is not None]
            medians[side][key] = statistics.median(values) if values else None
    ratios = {}
    if set(SIDES) <= set(rounds):
        for key, _, is_rate in METRICS:
            ours, theirs = medians["simclr"][key], medians["lightly"][key]
            if is_rate and ours is not None and theirs:
                ratios[key] = ours / theirs
    precision = rounds["simclr"][0]["precision"] if "simclr" in rounds else None
    return {"median": medians, "simclr_over_lightly": ratios, "simclr_precision": precision}


def format_table(summary_: dict[str, Any], args: argparse.Namespace) -> str:
    """The medians as a plain-text table, one column per side, and the ratio."""
    sides = list(summary_["median"])
    names = {"simclr": f"simclr ({summary_['simclr_precision']})",
             "lightly": f"lightly ({args.lightly_precision})"}  # fmt: skip
    header = ["", *(names[s] for s in sides)]
    if summary_["simclr_over_lightly"]:
        header.append("simclr/lightly")
    lines = [header]
    for key, label, _ in METRICS:
        row = [label]
        for side in sides:
            value = summary_["median"][side][key]
            row.append("n/a" if value is None else f"{value:.1f}")
        if summary_["simclr_over_lightly"]:
            ratio = summary_["simclr_over_lightly"].get(key)
            row.append(f"{ratio:.2f}x" if ratio else "")
        lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


if __name__ == "__main__":
    main()
