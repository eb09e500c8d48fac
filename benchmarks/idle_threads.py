"""`simclr embed` from the command line, with and without passive OpenMP waiting.

Inference commands set `OMP_WAIT_POLICY=PASSIVE` before torch loads
(simclr_cli/threads.py), so that torch's idle OpenMP threads sleep instead of spinning on the
core a decoding worker needs. This script times the whole command, as a user would, in two
arms called in turns: the command as shipped, and the same command in an interpreter that
imports torch first, which leaves GNU OpenMP at its defaults (idle threads spin for a while
before they sleep). Images/s counts the interpreter's start and the model load too.

    python benchmarks/idle_threads.py --out benchmarks/results/idle-threads-xeon.json

By default it embeds the photo configuration of bench_vs_lightly.py (3,000 JPEG crops of
scikit-image's photos at 96 px) with a randomly initialised ResNet-18, in fp32 (what
`--precision auto` picks for embedding on a CPU) and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_lightly import count_images, prepare_photos  # noqa: E402
from embed_vs_plain import _exported_random_model  # noqa: E402

# The two arms: the command line as installed, and the same after `import torch` (too late
# for the command to change OpenMP's waiting, so the runtime keeps its defaults).
_ARMS = {
    "passive (as shipped)": "from simclr_cli.cli.app import main\nmain()",
    "OpenMP defaults": "import torch\nfrom simclr_cli.cli.app import main\nmain()",
}


def _time_command(code: str, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", f"import sys\nsys.argv = ['simclr', *sys.argv[1:]]\n{code}", *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time both arms for each precision; print a table and return (and optionally write) it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--data", type=Path, help="a folder to embed (default: photo crops)")
    parser.add_argument("--model", type=Path, help="default: a random ResNet-18")
    parser.add_argument("--precision", action="append", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--workers", type=int, help="passed as --workers (default: the command's)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per arm, in turns")
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="idle-threads-"))
    data = args.data
    if data is None:
        data = work / "photos" / "train"
        if not data.is_dir():
            prepare_photos(work / "photos", images=args.images, eval_images=0)
    model = args.model or _exported_random_model(work / "model", args.image_size)
    count = count_images(data)
    record: dict[str, Any] = {
        "images": count,
        "data": str(data),
        "model": str(args.model or "random resnet18"),
        "workers": args.workers,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "results": {},
    }
    lines = []
    for precision in args.precision or ["fp32", "bf16"]:
        command = ["embed", str(data), "-o", str(work / "vecs.npy"), "--model", str(model)]
        command += ["--precision", precision, "-q"]
        if args.workers is not None:
            command += ["--workers", str(args.workers)]
        rates: dict[str, list[float]] = {arm: [] for arm in _ARMS}
        for _ in range(args.repeats):
            for arm, code in _ARMS.items():
                rates[arm].append(count / _time_command(code, command))
        medians = {arm: statistics.median(values) for arm, values in rates.items()}
        passive, default = medians.values()
        record["results"][precision] = {
            "images_per_s": rates,
            "median_images_per_s": medians,
            "passive_over_default": passive / default,
        }
        lines.append(
            f"{precision:5s} passive {passive:7.1f} img/s  OpenMP defaults {default:7.1f} img/s"
            f"  ratio {passive / default:.3f}  (runs: "
            + "; ".join(f"{arm}: " + " ".join(f"{v:.0f}" for v in rates[arm]) for arm in rates)
            + ")"
        )
    record["load_average_at_end"] = os.getloadavg()
    print(f"simclr embed of {count} images, whole command, median of {args.repeats} per arm")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
