"""`simclr pretrain`: self-supervised SimCLR pretraining on a folder of images."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
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
    absolute_if_local,
    check_output,
    given,
    print_error,
    user_errors,
)
from simclr_cli.errors import ConfigError, SimclrError

if TYPE_CHECKING:
    from simclr_cli.engine.pretrain import PretrainResult

_MODEL = "Model"
_OPTIM = "Optimisation"
_RUN = "Run"
_SCALE = "Scaling (docs/distributed.md)"


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
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start from pretrained weights: run or model folder, weights file, or Hub "
            "repo (owner/name\\[@revision]); the architecture must match.",
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
            help="auto, fp32, bf16 or fp16 (default: bf16/fp16 on CUDA, bf16 on CPUs with native "
            "bf16 arithmetic (AMX or AVX512-BF16), fp32 elsewhere).",
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
    devices: Annotated[
        int | None,
        typer.Option(
            "--devices",
            min=1,
            help="Start this many processes on this machine, as torchrun would (one per GPU, "
            "or CPU processes). For several machines run torchrun yourself.",
            rich_help_panel=_SCALE,
        ),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        typer.Option(
            "--sync-bn/--no-sync-bn",
            help="With several processes, batch norm over the global batch (default: on).",
            show_default=False,
            rich_help_panel=_SCALE,
        ),
    ] = None,
    dist_backend: Annotated[
        str | None,
        typer.Option(
            help="auto (NCCL on CUDA, gloo otherwise), nccl or gloo.", rich_help_panel=_SCALE
        ),
    ] = None,
    chunk_size: Annotated[
        int | None,
        typer.Option(
            "--chunk-size",
            min=1,
            help="Gradient caching: encode at most this many images at a time, so a large "
            "--batch-size fits in little memory (one more encoder forward pass per step).",
            rich_help_panel=_SCALE,
        ),
    ] = None,
    encoder_bn: Annotated[
        str | None,
        typer.Option(
            "--encoder-bn",
            help="batch (statistics per chunk with --chunk-size; default) or frozen (running "
            "statistics: chunked = full-batch gradients exactly).",
            rich_help_panel=_SCALE,
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

    if devices is not None and devices > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Workers get the same command line without --devices, and a fixed run folder so
        # that no process names its own from its clock.
        _launch(devices, out=out if resume is not None or out is not None else _default_out(data))
        return
    main_process = int(os.environ.get("RANK", "0")) == 0
    setup_logging(verbose=verbose, quiet=quiet or not main_process)
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
        init=absolute_if_local(init),
        device=device,
        precision=precision,
        num_workers=workers,
        cache_limit_gb=cache_limit_gb,
        checkpoint_minutes=checkpoint_minutes,
        strict=strict or None,
        max_pixels=max_pixels,
        sync_batchnorm=sync_bn,
        dist_backend=dist_backend,
        chunk_size=chunk_size,
        encoder_batchnorm=encoder_bn,
    )
    with user_errors() if main_process else _silent_errors():
        if resume is not None:
            if out is not None:
                raise ConfigError("--resume continues a run in its own folder; drop -o/--out")
            config = resume_config(
                resume, data=data, changed={**augment, **model, **optim}, **train
            )
        else:
            check_output(Path(out or _default_out(data)), folder=True)
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
    if main_process:
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
    # Interrupted in its first epoch, a run has no finished epoch to report a loss for.
    loss = (
        f"last epoch's mean loss {result.final_loss:.4f}"
        if math.isfinite(result.final_loss)
        else "no epoch finished yet"
    )
    console.print(
        f"{state}: {result.step} steps, {result.epochs_completed} epoch(s), "
        f"{loss}, {result.num_images} images "
        f"({len(result.skipped)} skipped) in {result.seconds / 60:.1f} min",
        highlight=False,
        markup=False,
    )
    console.print(f"run folder: {result.run_dir}", highlight=False, markup=False)
    if not result.interrupted:
        console.print(
            f"encoder: {result.run_dir / 'model.safetensors'} (+ config.json); "
            f"loss curve: {result.run_dir / 'loss.png'}",
            highlight=False,
            markup=False,
        )


@contextlib.contextmanager
def _silent_errors() -> Iterator[None]:
    """Ranks other than 0 exit 1 on a user error; rank 0 prints the same message once."""
    try:
        yield
    except SimclrError:
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None


def _launch(devices: int, *, out: Path | None) -> None:
    """Run this command in `devices` processes through torch's elastic launcher.

    The same launcher torchrun uses (`torch.distributed.launcher.api`), with a rendezvous on
    127.0.0.1 at a free port, as `torchrun --standalone` does.
    """
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    arguments = _without_devices(sys.argv[1:])
    named = any(a in ("-o", "--out", "--resume") or a.startswith("--out=") for a in arguments)
    if out is not None and not named:
        arguments += ["--out", str(out)]
    # One thread per process unless told otherwise: N processes each using every core
    # oversubscribe the CPU (torchrun sets the same default).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: loopback suffices
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=devices,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=0,
        local_addr="127.0.0.1",
        shutdown_timeout=120,  # on Ctrl-C, time for rank 0 to finish its step and checkpoint
    )
    try:
        elastic_launch(config, sys.executable)("-m", "simclr_cli", *arguments)
    except ChildFailedError as failure:
        codes = {f.exitcode for f in failure.failures.values()}
        code = 130 if 130 in codes else 1  # an interrupt stays an interrupt for scripts
        if not codes <= {1, 130}:  # 1 and 130 were already explained by rank 0
            print_error(
                f"a training process failed (exit codes {sorted(codes)}); see its messages above"
            )
        raise typer.Exit(code=code) from None
    except SignalException:  # Ctrl-C or SIGTERM: the launcher has stopped the workers by now
        raise typer.Exit(code=130) from None


def _without_devices(arguments: list[str]) -> list[str]:
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--devices":
            skip = True
        elif not argument.startswith("--devices="):
            kept.append(argument)
    return kept
