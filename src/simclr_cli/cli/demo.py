"""`simclr demo`: the whole loop on built-in real digits, with a before/after comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import (
    DeviceOption,
    QuietOption,
    VerboseOption,
    print_error,
    user_errors,
)


def demo_command(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where the digits and the run go.")
    ] = Path("runs/demo"),
    epochs: Annotated[
        int, typer.Option(min=1, help="Pretraining epochs over the 4,000 training digits.")
    ] = 12,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed of every random stream.")] = 0,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Pretrain on 4,000 real MNIST digits, then compare kNN accuracy with random init."""
    from simclr_cli.console import make_reporter, output_console, setup_logging
    from simclr_cli.engine.demo import run_demo

    setup_logging(verbose=verbose, quiet=quiet)
    with user_errors():
        result = run_demo(
            out, epochs=epochs, device=device, seed=seed, reporter=make_reporter(quiet=quiet)
        )
    if result.interrupted:
        print_error(
            "the demo stopped before pretraining finished, so there is no result to show; run "
            "the same `simclr demo` command again to continue from its last checkpoint and "
            "compare (`simclr pretrain --resume` would finish training without the comparison)"
        )
        raise typer.Exit(code=130)  # as `simclr pretrain` does after Ctrl-C
    from rich.table import Table

    table = Table(title=f"kNN top-1 on {result.test_images} held-out digits (k=20)")
    table.add_column("encoder")
    table.add_column("accuracy", justify="right")
    table.add_row("random initialisation", f"{100 * result.knn_random_init:.1f}%")
    table.add_row(f"SimCLR, {epochs} epochs", f"{100 * result.knn_pretrained:.1f}%")
    console = output_console()
    console.print(table)
    console.print(
        f"gain from pretraining: {result.gain:+.1f} points; pretrained on {result.train_images} "
        f"unlabelled digits in {result.pretrain_seconds / 60:.1f} min. Data: {result.dataset}. "
        f"Run folder: {result.run_dir}",
        highlight=False,
        markup=False,
    )
