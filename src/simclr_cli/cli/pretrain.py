"""`simclr pretrain`: self-supervised SimCLR pretraining on a folder of images."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simclr_cli.cli._augment import (
    BlurProbOption,
    CropMinAreaOption,
    FlipProbOption,
    ImageSizeOption,
    JitterStrengthOption,
    augment_choices,
)
from simclr_cli.cli._common import (
    MaxPixelsOption,
    QuietOption,
    StrictOption,
    VerboseOption,
    WorkersOption,
    given,
    user_errors,
)
from simclr_cli.errors import ConfigError

if TYPE_CHECKING:
    from simclr_cli.engine.pretrain import PretrainResult

_MODEL = "Model"
_OPTIM = "Optimisation"
_RUN = "Run"


def pretrain_command(
    data: Annotated[
        Path | None,
        typer.Argument(help="Folder of images (scanned recursively).", show_default=False),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Run folder (default: runs/<folder>-<time>).", rich_help_panel=_RUN
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the run in this folder from its last checkpoint.",
            rich_help_panel=_RUN,
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the data (default: 100).", rich_help_panel=_RUN)
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per step, two views each (default: 256); more images, more negatives.",
            rich_help_panel=_RUN,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of every random stream (default: 0).", rich_help_panel=_RUN),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu, cuda, cuda:N or mps (default: auto).", rich_help_panel=_RUN),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto, fp32, bf16 or fp16 (default: bf16/fp16 on CUDA, fp32 elsewhere).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    workers: WorkersOption = None,
    cache_limit_gb: Annotated[
        float | None,
        typer.Option(
            help="Keep decoded images in RAM up to this size (default: 4).", rich_help_panel=_RUN
        ),
    ] = None,
    checkpoint_minutes: Annotated[
        float | None,
        typer.Option(
            help="Also checkpoint this often within an epoch (default: 10).", rich_help_panel=_RUN
        ),
    ] = None,
    image_size: ImageSizeOption = None,
    crop_min_area: CropMinAreaOption = None,
    flip_prob: FlipProbOption = None,
    jitter_strength: JitterStrengthOption = None,
    blur_prob: BlurProbOption = None,
    arch: Annotated[
        str | None,
        typer.Option(
            help="resnet18, resnet34, resnet50, resnet101 or resnet152 (default: resnet18).",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    small_stem: Annotated[
        bool | None,
        typer.Option(
            "--small-stem/--standard-stem",
            help="3x3 stride-1 stem without max-pool (default: on at 64 px or less).",
            show_default=False,
            rich_help_panel=_MODEL,
        ),
    ] = None,
    projection_dim: Annotated[
        int | None,
        typer.Option(
            help="Output size of the projection head (default: 128).", rich_help_panel=_MODEL
        ),
    ] = None,
    projection_layers: Annotated[
        int | None,
        typer.Option(
            help="Linear layers in the projection head, 2 or 3 (default: 2).",
            rich_help_panel=_MODEL,
        ),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="lars, sgd or adamw (default: lars).", rich_help_panel=_OPTIM)
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Base LR before batch scaling (default: 0.3 LARS/SGD, 1e-3 AdamW); lower on NaN.",
            rich_help_panel=_OPTIM,
        ),
    ] = None,
    lr_scaling: Annotated[
        str | None,
        typer.Option(
            help="linear (lr*B/256), sqrt (lr*sqrt(B), base 0.075) or none (default: linear).",
            rich_help_panel=_OPTIM,
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(help="(default: 1e-6 LARS/SGD, 1e-4 AdamW).", rich_help_panel=_OPTIM),
    ] = None,
    warmup_epochs: Annotated[
        float | None,
        typer.Option(
            help="Linear warmup, capped at 10% of the run (default: 10).", rich_help_panel=_OPTIM
        ),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(
            help="NT-Xent temperature (default: 0.5); 0.1-0.2 often suits longer runs.",
            rich_help_panel=_OPTIM,
        ),
    ] = None,
    strict: StrictOption = False,
    max_pixels: MaxPixelsOption = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Pretrain a ResNet encoder with SimCLR on an unlabeled folder of images."""
    from simclr_cli.config import build_run_config
    from simclr_cli.console import make_reporter, setup_logging
    from simclr_cli.engine.pretrain import pretrain, resume_config

    setup_logging(verbose=verbose, quiet=quiet)
    augment = augment_choices(
        image_size=image_size,
        crop_min_area=crop_min_area,
        flip_prob=flip_prob,
        jitter_strength=jitter_strength,
        blur_prob=blur_prob,
    )
    model = given(
        arch=arch,
        small_stem=small_stem,
        projection_dim=projection_dim,
        projection_layers=projection_layers,
    )
    optim = given(
        optimizer=optimizer,
        base_lr=lr,
        lr_scaling=lr_scaling,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
    )
    train = given(
        epochs=epochs,
        global_batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        device=device,
        precision=precision,
        num_workers=workers,
        cache_limit_gb=cache_limit_gb,
        checkpoint_minutes=checkpoint_minutes,
        strict=strict or None,
        max_pixels=max_pixels,
    )
    with user_errors():
        if resume is not None:
            if out is not None:
                raise ConfigError("--resume continues a run in its own folder; drop -o/--out")
            config = resume_config(
                resume, data=data, changed={**augment, **model, **optim}, **train
            )
        else:
            config = build_run_config(
                augment=augment,
                model=model,
                optim=optim,
                train={
                    **train,
                    "data_dir": _required(data),
                    "out_dir": str(out or _default_out(data)),
                },
            )
        result = pretrain(config, reporter=make_reporter(quiet=quiet), resume=resume is not None)
    _render(result)
    if result.interrupted:
        raise typer.Exit(code=130)  # like any program stopped by Ctrl-C: scripts must not go on


def _required(data: Path | None) -> str:
    if data is None:
        raise ConfigError("give the folder of images to train on (or --resume RUN)")
    return str(data.absolute())  # the run may later be resumed from another directory


def _default_out(data: Path | None) -> Path:
    name = (data.resolve().name if data else "run") or "run"
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _render(result: PretrainResult) -> None:
    from simclr_cli.console import output_console

    console = output_console()
    state = "interrupted" if result.interrupted else "finished"
    console.print(
        f"{state}: {result.step} steps, {result.epochs_completed} epoch(s), "
        f"last epoch's mean loss {result.final_loss:.4f}, {result.num_images} images "
        f"({len(result.skipped)} skipped) in {result.seconds / 60:.1f} min",
        highlight=False,
    )
    console.print(f"run folder: {result.run_dir}", highlight=False)
    if not result.interrupted:
        console.print(
            f"encoder: {result.run_dir / 'model.safetensors'} (+ config.json); "
            f"loss curve: {result.run_dir / 'loss.png'}",
            highlight=False,
        )
