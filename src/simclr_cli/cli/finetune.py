"""`simclr finetune`: a classifier from a pretrained encoder and a few labels."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simclr_cli.cli._common import (
    DeviceOption,
    MaxPixelsOption,
    PrecisionOption,
    QuietOption,
    StrictOption,
    VerboseOption,
    WorkersOption,
    absolute_if_local,
    given,
    user_errors,
)
from simclr_cli.errors import ConfigError

if TYPE_CHECKING:
    from simclr_cli.engine.finetune import FinetuneResult

_DATA = "Labels"
_TRAIN = "Training"


def finetune_command(
    train_dir: Annotated[
        Path | None,
        typer.Argument(help="Labelled folder, one subfolder per class.", show_default=False),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Pretrained encoder: run folder, model folder, weights file, or Hugging Face "
            "Hub repo (owner/name\\[@revision]).",
            show_default=False,
        ),
    ] = None,
    test: Annotated[
        Path | None, typer.Option("--test", help="Labelled test folder to report accuracy on.")
    ] = None,
    label_fraction: Annotated[
        float | None,
        typer.Option(
            help="Share of each class's labels to train on (default: 0.1; the paper uses "
            "0.01 and 0.1).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    labels_per_class: Annotated[
        int | None,
        typer.Option(help="Or: this many labelled images per class.", rich_help_panel=_DATA),
    ] = None,
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch",
            help="Same architecture and labels, random initial weights: the baseline that "
            "shows what pretraining adds.",
            rich_help_panel=_TRAIN,
        ),
    ] = False,
    freeze_encoder: Annotated[
        bool,
        typer.Option(
            "--freeze-encoder",
            help="Train the new linear head only; the encoder and its batch norm stay fixed.",
            rich_help_panel=_TRAIN,
        ),
    ] = False,
    epochs: Annotated[
        int | None,
        typer.Option(help="Passes over the labelled images (default: 30).", rich_help_panel=_TRAIN),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", "-b", help="(default: 64).", rich_help_panel=_TRAIN),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            help="sgd (Nesterov momentum, the paper's) or adamw (default: sgd).",
            rich_help_panel=_TRAIN,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate, cosine-decayed (default: 0.05 x batch / 256 for sgd, "
            "1e-3 for adamw).",
            rich_help_panel=_TRAIN,
        ),
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="(default: 0, as in the paper).", rich_help_panel=_TRAIN)
    ] = None,
    crop_min_area: Annotated[
        float | None,
        typer.Option(help="Smallest random crop (default: 0.08).", rich_help_panel=_TRAIN),
    ] = None,
    flip_prob: Annotated[
        float | None,
        typer.Option(
            help="Horizontal flip probability (default: 0.5; 0 for digits or text).",
            rich_help_panel=_TRAIN,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the label subset, the order and the crops (default: 0)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Run folder (default: runs/finetune-<folder>-<time>)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the fine-tuning run in this folder."),
    ] = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: WorkersOption = None,
    strict: StrictOption = False,
    max_pixels: MaxPixelsOption = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fine-tune a pretrained encoder plus a linear head on a few labels, then test it."""
    from simclr_cli.console import make_reporter, setup_logging
    from simclr_cli.engine.finetune import FinetuneConfig, finetune, resume_finetune_config

    setup_logging(verbose=verbose, quiet=quiet)
    choices = given(
        model=model,
        from_scratch=from_scratch or None,
        freeze_encoder=freeze_encoder or None,
        label_fraction=label_fraction,
        labels_per_class=labels_per_class,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        crop_min_area=crop_min_area,
        flip_prob=flip_prob,
        seed=seed,
    )
    safe = given(
        test_dir=str(test.absolute()) if test else None,
        device=device,
        num_workers=workers,
        strict=strict or None,
        max_pixels=max_pixels,
    )
    with user_errors():
        if resume is not None:
            if out is not None or train_dir is not None:
                raise ConfigError("--resume continues a run with its own folders; drop them")
            config = resume_finetune_config(resume, **choices, **safe)
        else:
            if train_dir is None:
                raise ConfigError("give the labelled folder to fine-tune on (or --resume RUN)")
            if model is None:
                raise ConfigError(
                    "give --model (a pretrained run or model folder; with --from-scratch its "
                    "architecture and preprocessing are used, not its weights)"
                )
            if labels_per_class is not None and label_fraction is not None:
                raise ConfigError("give --label-fraction or --labels-per-class, not both")
            if labels_per_class is not None:
                choices["label_fraction"] = None
            config = FinetuneConfig(
                train_dir=str(train_dir.absolute()),
                out_dir=str(out or _default_out(train_dir)),
                precision=precision,
                **{**choices, **safe, "model": absolute_if_local(model)},
            )
        result = finetune(config, reporter=make_reporter(quiet=quiet), resume=resume is not None)
    _render(result)
    if result.interrupted:
        raise typer.Exit(code=130)


def _default_out(train_dir: Path) -> Path:
    name = train_dir.resolve().name or "data"
    return Path("runs") / f"finetune-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _render(result: FinetuneResult) -> None:
    from simclr_cli.console import output_console

    console = output_console()
    state = "interrupted" if result.interrupted else "finished"
    console.print(
        f"{state}: {result.step} steps, {result.epochs_completed} epoch(s) on "
        f"{result.labelled_images} labelled images, last epoch's mean loss "
        f"{result.final_loss:.4f}, in {result.seconds / 60:.1f} min"
        + (f" ({len(result.skipped)} unreadable file(s) skipped)" if result.skipped else ""),
        highlight=False,
        markup=False,
    )
    if result.test_accuracy is not None:
        console.print(
            f"test accuracy: {100 * result.test_accuracy:.1f}% on {result.test_images} images",
            highlight=False,
            markup=False,
        )
    console.print(f"run folder: {result.run_dir}", highlight=False, markup=False)
    if not result.interrupted:
        console.print(
            f"classifier: {result.run_dir / 'model.safetensors'} (+ config.json); use it with "
            f"simclr predict DIR --model {result.run_dir}",
            highlight=False,
            markup=False,
        )
