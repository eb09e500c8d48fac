"""`simclr predict`: classify every image in a folder with a fine-tuned classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import (
    DeviceOption,
    ForwardBatchOption,
    MaxPixelsOption,
    PrecisionOption,
    QuietOption,
    StrictOption,
    VerboseOption,
    WorkersOption,
    check_output,
    user_errors,
)
from simclr_cli.threads import let_idle_threads_sleep


def predict_command(
    data: Annotated[
        Path, typer.Argument(help="Folder of images (scanned recursively).", show_default=False)
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Classifier folder written by simclr finetune.",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV: one row per image file.")] = Path(
        "predictions.csv"
    ),
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes listed per image.")] = 3,
    batch_size: ForwardBatchOption = 256,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: WorkersOption = None,
    strict: StrictOption = False,
    max_pixels: MaxPixelsOption = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Predict a class for every image; unreadable files are listed in the CSV, not fatal."""
    let_idle_threads_sleep()  # before torch loads (simclr_cli/threads.py)
    from simclr_cli.console import make_reporter, output_console, setup_logging
    from simclr_cli.engine.predict import PredictOptions, predict_folder

    setup_logging(verbose=verbose, quiet=quiet)
    options = PredictOptions(
        top_k=top_k,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        strict=strict,
        max_pixels=max_pixels,
    )
    with user_errors():
        check_output(out, folder=False)
        result = predict_folder(
            data, model, out, options=options, reporter=make_reporter(quiet=quiet)
        )
    common = sorted(result.class_counts.items(), key=lambda item: -item[1])[:5]
    summary = ", ".join(f"{name} {count}" for name, count in common if count)
    output_console().print(
        f"wrote {result.predicted} predictions ({len(result.skipped)} unreadable files listed) "
        f"to {result.csv_path} in {result.seconds:.1f} s; predictions per class (top 5): {summary}",
        highlight=False,
        markup=False,
    )
