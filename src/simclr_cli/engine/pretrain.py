"""SimCLR pretraining on a folder of images.

Phases: device, run folder, data, model and optimiser, resume, loop, export. All randomness
comes from named streams of the run seed (`simclr_cli.seeding`): model init, each epoch's
order and each step's augmentations. A run resumed from any checkpoint therefore replays the
same batches, views, learning rates and losses as one that was never interrupted.

Under torchrun every process runs this module on its share of each global batch
(`engine/parallel_step.py`, docs/distributed.md); rank 0 alone writes the run folder and
reports progress. With one process and no `chunk_size` the step is the plain one below.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from simclr_cli import __version__
from simclr_cli.allocator import freed_memory_kept
from simclr_cli.checkpoint import (
    atomic_write,
    load_checkpoint,
    save_exported_model,
    save_training_checkpoint,
)
from simclr_cli.config import (
    RunConfig,
    TrainConfig,
    blur_probability,
    decode_size,
    resolved_lr,
    resolved_weight_decay,
    uses_small_stem,
    warmup_steps,
)
from simclr_cli.data.augment import make_view_batch
from simclr_cli.data.images import RUN_MARKER, scan_images
from simclr_cli.data.loader import (
    ImageBatches,
    SkipLog,
    batches_per_epoch,
    cache_fill_workers,
    default_num_workers,
)
from simclr_cli.device import Precision, autocast, resolve_precision
from simclr_cli.distributed import DistContext, convert_sync_batchnorm, setup, teardown
from simclr_cli.engine.grad_cache import freeze_batchnorm
from simclr_cli.engine.interrupts import stop_on_signal
from simclr_cli.engine.metrics import MetricsLog, plot_loss_curve
from simclr_cli.engine.parallel_step import EpochShard, StepViews, batch_gradients
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    format_bytes,
    os_error_reason,
    output_location_problem,
)
from simclr_cli.loss import nt_xent_loss
from simclr_cli.models.export import (
    CHECKPOINT_RELATIVE_PATH,
    RUN_CONFIG_NAME,
    LoadedModel,
    export_config,
    load_model,
)
from simclr_cli.models.simclr import SimCLRModel, build_model
from simclr_cli.optim import build_optimizer, learning_rate_at
from simclr_cli.seeding import derive_seed, generator_for

__all__ = ["PretrainResult", "initial_model", "pretrain", "resume_config"]

logger = logging.getLogger(__name__)

# Settings a resumed run may change: they alter neither the model nor the batches it sees.
RESUMABLE_FIELDS = frozenset(
    {
        "epochs",
        "device",
        "num_workers",
        "cache_limit_gb",
        "checkpoint_minutes",
        "strict",
        "max_pixels",
        "dist_backend",
    }
)


@dataclass(frozen=True)
class PretrainResult:
    """What a finished (or interrupted) run produced."""

    run_dir: Path
    step: int
    epochs_completed: int
    final_loss: float
    num_images: int
    skipped: dict[str, str]
    interrupted: bool
    seconds: float


LOSS_PLOT_SECONDS = 30.0  # least time between two redraws of loss.png during a run


@dataclass
class _Loop:
    """Mutable training state; everything a checkpoint must restore."""

    model: SimCLRModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_loss: float = math.nan
    images_per_s: float = 0.0
    dataset: dict[str, Any] = field(default_factory=dict)  # size and fingerprint of the images
    interrupted: bool = False
    epoch_mean_loss: float = math.nan
    stop_requested: bool = False  # several processes: a signal here, not yet agreed by all
    plotted_at: float = -math.inf  # when loss.png was last drawn (time.monotonic); not saved


# Config fields whose command-line option is not "--" plus the field name with dashes.
_OPTION_OF_FIELD = {
    "base_lr": "--lr",
    "global_batch_size": "--batch-size",
    "crop_area": "--crop-min-area",
    "num_workers": "--workers",
    "small_stem": "--small-stem/--standard-stem",
    "sync_batchnorm": "--sync-bn",
    "encoder_batchnorm": "--encoder-bn",
}


def option_name(field_name: str) -> str:
    """The option a user types for a config field (`base_lr` -> `--lr`)."""
    return _OPTION_OF_FIELD.get(field_name, "--" + field_name.replace("_", "-"))


def resume_config(
    run_dir: Path,
    *,
    data: Path | None = None,
    changed: dict[str, Any] | None = None,
    **overrides: Any,
) -> RunConfig:
    """The saved config of a run, with only the safe settings changed.

    Args:
        run_dir: The run folder to continue.
        data: The image folder, if the user named it; it must be the run's own.
        changed: Augmentation, model or optimiser settings the user asked for; any is refused.
        **overrides: Train settings; only those in `RESUMABLE_FIELDS` may differ.
    """
    path = run_dir / RUN_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no {RUN_CONFIG_NAME})")
    try:
        saved = RunConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: damaged or not a simclr run config ({type(error).__name__}); "
            "it cannot be resumed"
        ) from None
    saved_values = {k: v for part in saved.to_dict().values() for k, v in part.items()}
    asked = {**(changed or {}), **overrides}
    # Repeating a run's own value is harmless; only real changes outside the safe set count.
    refused = sorted(
        option_name(name)
        for name, value in asked.items()
        if name not in RESUMABLE_FIELDS and _plain(value) != _plain(saved_values.get(name))
    )
    if refused:
        raise ConfigError(
            f"cannot change {', '.join(refused)} when resuming: that would silently change the "
            "run; start a new run instead (resume may change --epochs, --device, --workers, "
            "--cache-limit-gb, --checkpoint-minutes, --strict, --max-pixels, --dist-backend "
            "and the number of processes)"
        )
    if data is not None and Path(data).resolve() != Path(saved.train.data_dir).resolve():
        raise ConfigError(
            f"this run trains on {saved.train.data_dir}, not {data}; omit the folder when resuming"
        )
    safe = {k: v for k, v in overrides.items() if k in RESUMABLE_FIELDS}
    train = replace(saved.train, out_dir=os.path.abspath(run_dir), **safe)
    return replace(saved, train=train)


def pretrain(
    config: RunConfig, *, reporter: Reporter | None = None, resume: bool = False
) -> PretrainResult:
    """Train (or resume) a run and export its encoder; see the module docstring."""
    started = time.monotonic()
    context, device = setup(config.train.device, config.train.dist_backend)
    try:
        # Rank 0's config everywhere: its default run-folder name carries its clock.
        config = context.broadcast_object(config)
        if not context.is_main:
            reporter = NullReporter()
        return _pretrain(
            config, context, device, reporter or NullReporter(), resume=resume, started=started
        )
    finally:
        teardown(context)


def _pretrain(
    config: RunConfig,
    context: DistContext,
    device: torch.device,
    reporter: Reporter,
    *,
    resume: bool,
    started: float,
) -> PretrainResult:
    precision = resolve_precision(config.train.precision, device, training=True)
    if config.train.out_dir:  # absolute, so the run resumes from any working directory
        config = replace(
            config, train=replace(config.train, out_dir=os.path.abspath(config.train.out_dir))
        )
    run_dir = Path(config.train.out_dir)
    paths = _scan(config.train, run_dir)
    context.on_main(lambda: _check_run_dir(run_dir, resume=resume))
    banner = _banner(config, device=device, precision=precision, run_dir=run_dir)
    reporter.message(banner + _parallel_banner(config.train, context))
    skip_log = SkipLog(strict=config.train.strict)
    data = _prepare_data(
        config.train,
        paths,
        canvas_size=decode_size(config.augment),
        skip_log=skip_log,
        reporter=reporter,
    )
    config = _fit_batch_to_data(config, len(data.readable_indices), context, reporter)
    num_images = len(data.readable_indices)
    # A resumed run takes its weights from its checkpoint; --init only seeds step 0.
    has_checkpoint = resume and (run_dir / CHECKPOINT_RELATIVE_PATH).is_file()
    loop = _build_loop(config, device, precision, context, with_init=not has_checkpoint)
    # Only once the data and --init are known to be usable; rank 0 writes, and its errors
    # reach every rank.
    context.on_main(lambda: _check_free_space(run_dir, loop, config.optim.optimizer, resume=resume))
    context.on_main(lambda: _prepare_run_dir(config, resume=resume))
    loop.dataset = _dataset_identity(data, config.train.data_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl") if context.is_main else _NoMetrics()
    if resume:
        _restore(loop, config, run_dir, metrics, reporter)  # every rank loads the same file
        _say_if_precision_changed(metrics.read(), precision, device, reporter)
    context.broadcast_module(loop.model)
    record = _start_record(
        config, device=device, precision=precision, loop=loop, num_images=num_images
    )
    metrics.append({**record, **_parallel_record(config.train, context)})

    with stop_on_signal(loop, agree=context.enabled):
        _train(
            loop,
            config,
            data,
            device=device,
            precision=precision,
            run_dir=run_dir,
            metrics=metrics,
            reporter=reporter,
            context=context,
        )

    if context.is_main:
        plot_loss_curve(metrics.read(), run_dir / "loss.png")
    if not loop.interrupted and context.is_main:
        _warn_if_at_chance(loop.epoch_mean_loss, config.train.global_batch_size, reporter)
        training = {
            "epochs": config.train.epochs,
            "steps": loop.step,
            "images": num_images,
            "final_loss": loop.epoch_mean_loss,
            "batch_size": config.train.global_batch_size,
            "temperature": config.train.temperature,
            "dataset": config.train.data_dir,
        }
        try:
            save_exported_model(run_dir, loop.model.state_dict(), export_config(config, training))
        except OSError as error:
            raise CheckpointError(
                f"could not write the final model to {run_dir} ({os_error_reason(error)}); the "
                f"last checkpoint is intact: free some space, then export it with "
                f"simclr pretrain --resume {run_dir}"
            ) from None
    return PretrainResult(
        run_dir=run_dir,
        step=loop.step,
        epochs_completed=loop.epoch,
        final_loss=loop.epoch_mean_loss,
        num_images=num_images if data.cached else num_images - skip_log.count,
        skipped=dict(skip_log.skipped),
        interrupted=loop.interrupted,
        seconds=time.monotonic() - started,
    )


def _fit_batch_to_data(
    config: RunConfig, num_images: int, context: DistContext, reporter: Reporter
) -> RunConfig:
    """Shrink a batch larger than the folder to the folder, saying so.

    The learning rate is scaled from the batch actually used, and the run config records
    that batch, so a resume continues the same run.
    """
    batch = config.train.global_batch_size
    if num_images >= batch:
        return config
    if context.enabled:
        raise ConfigError(
            f"--batch-size {batch} is larger than the {num_images} readable images; "
            f"use -b {num_images - num_images % context.world_size} or less"
        )
    fitted = replace(config, train=replace(config.train, global_batch_size=num_images))
    reporter.message(
        f"warning: --batch-size {batch} is larger than the {num_images} readable images; "
        f"training with batches of {num_images} (peak lr "
        f"{resolved_lr(fitted.optim, num_images):.4g}, scaled from that batch)"
    )
    return fitted


def _warn_if_at_chance(mean_loss: float, batch: int, reporter: Reporter) -> None:
    """Say so when the run ended where it started: NT-Xent of unrelated embeddings.

    With 2B views, each anchor picks its positive among 2B - 1 candidates, so an encoder
    that has learned nothing scores log(2B - 1). Short runs with the paper's LARS settings on
    small batches often end there, and the features are then no better than random ones.
    """
    chance = math.log(2 * batch - 1)
    if math.isfinite(mean_loss) and mean_loss > 0.99 * chance:
        reporter.message(
            f"warning: the last epoch's mean loss {mean_loss:.3f} is at chance level "
            f"(log(2 x {batch} - 1) = {chance:.3f}): the encoder has barely learned. Train "
            "longer, or for short runs try --optimizer adamw --lr 1e-3 --lr-scaling none "
            "--temperature 0.2 (what simclr demo uses; docs/pretrain.md)"
        )


def _prepare_run_dir(config: RunConfig, *, resume: bool) -> Path:
    """Create the run folder, check it is writable, and save (or check) the config."""
    run_dir = Path(config.train.out_dir)
    config_path = run_dir / RUN_CONFIG_NAME
    if not resume and config_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} "
            "or pick another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_MARKER).write_text("simclr-cli run folder; not scanned as input\n")
        # On resume too: the safe changes (more epochs, say) become the run's own, so a later
        # plain --resume continues this plan, not the one the run started with.
        text = json.dumps(config.to_dict(), indent=2) + "\n"
        atomic_write(config_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise ConfigError(
            f"cannot write to the run folder {run_dir}: {os_error_reason(error)}"
        ) from None
    return run_dir


def _check_free_space(run_dir: Path, loop: _Loop, optimizer: str, *, resume: bool) -> None:
    """Refuse a disk that cannot hold the run's checkpoints, before the first step.

    A checkpoint holds the weights and the optimiser's per-weight buffers; an atomic save
    needs room for the new file beside the old one, and the run ends by exporting the
    weights. Found only at the first save, a full disk would cost the first epoch.
    """
    weights = sum(t.numel() * t.element_size() for t in loop.model.state_dict().values())
    buffers = {"sgd": 1, "lars": 1}.get(optimizer, 2)  # momentum; AdamW keeps two moments
    checkpoint = weights * (1 + buffers)
    needed = checkpoint * (1 if resume else 2) + weights
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(
            f"the disk of {run_dir} has {format_bytes(free)} free; this run's checkpoints need "
            f"about {format_bytes(needed)} (two copies during a save, plus the exported "
            "encoder). Free some space or choose another --out"
        )


def _check_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Refuse an output folder the run could not use, before any image is decoded.

    The run folder itself is only made once the data and --init are known to be usable (so
    a failed start leaves nothing behind); this checks now, without creating anything.
    """
    if not resume and (run_dir / RUN_CONFIG_NAME).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; resume it with --resume {run_dir} "
            "or pick another --out"
        )
    problem = output_location_problem(run_dir)
    if problem:
        raise ConfigError(f"cannot write to the run folder {run_dir}: {problem}")


def _scan(train: TrainConfig, run_dir: Path) -> list[Path]:
    """Image files of the run, checked before anything is written."""
    if not train.out_dir:
        raise ConfigError("no output folder given for the run")
    paths = scan_images(train.data_dir, exclude=[run_dir])
    if not paths:
        raise DataError(f"{train.data_dir}: no images found (looked for common image extensions)")
    return paths


def _start_record(
    config: RunConfig, *, device: torch.device, precision: Precision, loop: _Loop, num_images: int
) -> dict[str, Any]:
    """What `auto` and unset options resolved to, logged each time the run starts or resumes."""
    steps_per_epoch = batches_per_epoch(num_images, config.train.global_batch_size)
    return {
        "kind": "start",
        "step": loop.step,
        "simclr_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "precision": precision.name,
        "freed_memory_kept": freed_memory_kept(),
        "images": num_images,
        "steps_per_epoch": steps_per_epoch,
        "peak_lr": resolved_lr(config.optim, config.train.global_batch_size),
        "weight_decay": resolved_weight_decay(config.optim),
        "warmup_steps": warmup_steps(
            config.optim, epochs=config.train.epochs, steps_per_epoch=steps_per_epoch
        ),
        "blur_prob": blur_probability(config.augment),
        "small_stem": uses_small_stem(config.model, config.augment.image_size),
    }


def _banner(config: RunConfig, *, device: torch.device, precision: Precision, run_dir: Path) -> str:
    """The line a run opens with: versions, device and the settings that matter most."""
    train, augment = config.train, config.augment
    lr = resolved_lr(config.optim, train.global_batch_size)
    return (
        f"simclr {__version__} (torch {torch.__version__}) | device {device} | "
        f"precision {precision.name} | {config.model.arch} at {augment.image_size} px | "
        f"batch {train.global_batch_size} | {train.epochs} "
        f"epoch{'s' if train.epochs != 1 else ''} | {config.optim.optimizer} "
        f"lr {lr:.4g} | temperature {train.temperature} | "
        f"{'malloc keeps freed memory | ' if freed_memory_kept() else ''}run {run_dir}"
    )


def _prepare_data(
    train: TrainConfig,
    paths: list[Path],
    *,
    canvas_size: int,
    skip_log: SkipLog,
    reporter: Reporter,
) -> ImageBatches:
    """Decode the images into RAM when they fit, and insist on two readable images."""
    workers = train.num_workers if train.num_workers is not None else default_num_workers()
    data = ImageBatches(
        paths,
        canvas_size=canvas_size,
        num_workers=workers,
        skip_log=skip_log,
        max_pixels=train.max_pixels,
    )
    if data.canvas_bytes() <= train.cache_limit_gb * 2**30:
        size = data.canvas_bytes()
        shown = format_bytes(size)
        reporter.message(f"decoding {len(paths)} images into memory ({shown})")
        data.cache(num_workers=cache_fill_workers(train.num_workers))
    elif _first_readable(data) is None:
        raise DataError(f"{train.data_dir}: none of the {len(paths)} image files could be read")
    readable = len(data.readable_indices)
    if readable == 0:
        raise DataError(f"{train.data_dir}: none of the {len(paths)} image files could be read")
    if readable < 2:
        raise DataError(
            f"{train.data_dir}: only one readable image; SimCLR contrasts each image with the "
            "others in its batch, so it needs at least two"
        )
    if skip_log.count:
        reporter.message(f"skipped {skip_log.count} unreadable file(s); see the warnings above")
    return data


def _dataset_identity(data: ImageBatches, root: str) -> dict[str, Any]:
    """Count and hash of the readable files, so a resume notices a changed folder.

    Paths are hashed relative to the folder, so the folder itself may move.
    """
    digest = hashlib.sha256()
    for index in data.readable_indices.tolist():
        relative = os.path.relpath(data.paths[index], root)
        digest.update(relative.encode("utf-8", "surrogateescape") + b"\0")
    return {"images": len(data.readable_indices), "sha256": digest.hexdigest()}


def _first_readable(data: ImageBatches) -> int | None:
    """Decode files in order until one works (a streamed folder may be all junk)."""
    for batch in data.iterate(range(len(data.paths)), batch_size=16):
        return int(batch.indices[0])
    return None


def initial_model(config: RunConfig) -> LoadedModel:
    """The encoder exactly as a run with this config starts, before any step (a baseline)."""
    model = _initial_network(config)
    return LoadedModel(model.backbone, model.projection_head, export_config(config, {"steps": 0}))


def _initial_network(config: RunConfig, *, with_init: bool = True) -> SimCLRModel:
    torch.manual_seed(derive_seed(config.train.seed, "model-init"))
    model = build_model(config.model, image_size=config.augment.image_size)
    if config.train.init and with_init:
        _load_init(model, config.train.init)
    return model


def _load_init(model: SimCLRModel, ref: str) -> None:
    """Copy pretrained weights into the new network; the architectures must agree."""
    source = load_model(ref)
    if (source.backbone.arch, source.backbone.small_stem) != (
        model.backbone.arch,
        model.backbone.small_stem,
    ):
        raise ConfigError(
            f"--init {ref} is a {source.backbone.arch} "
            f"({'small' if source.backbone.small_stem else 'standard'} stem); this run builds a "
            f"{model.backbone.arch} ({'small' if model.backbone.small_stem else 'standard'} "
            "stem). Pass the same --arch and --small-stem/--standard-stem"
        )
    model.backbone.load_state_dict(source.backbone.state_dict())
    head = source.projection_head
    if (
        head is not None
        and all(
            model.projection_head.state_dict()[k].shape == v.shape
            for k, v in head.state_dict().items()
        )
        and head.state_dict().keys() == model.projection_head.state_dict().keys()
    ):
        model.projection_head.load_state_dict(head.state_dict())
        logger.info("--init: encoder and projection head copied from %s", ref)
    else:
        logger.warning("--init: encoder copied from %s; the projection head starts fresh", ref)


def _build_loop(
    config: RunConfig,
    device: torch.device,
    precision: Precision,
    context: DistContext,
    *,
    with_init: bool = True,
) -> _Loop:
    model = _initial_network(config, with_init=with_init).to(device)
    if context.enabled and config.train.sync_batchnorm:
        model = convert_sync_batchnorm(model, device)  # type: ignore[assignment]
    model = model.to(memory_format=torch.channels_last)
    lr = resolved_lr(config.optim, config.train.global_batch_size)
    optimizer = build_optimizer(model, config.optim, lr=lr)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    return _Loop(model=model, optimizer=optimizer, scaler=scaler)


def _restore(
    loop: _Loop, config: RunConfig, run_dir: Path, metrics: MetricsLog, reporter: Reporter
) -> None:
    """Load the last checkpoint into the loop, refusing one from a different run."""
    path = run_dir / CHECKPOINT_RELATIVE_PATH
    if not path.is_file():
        reporter.message(f"{run_dir}: no checkpoint yet; starting this run from step 0")
        metrics.truncate_after(0)
        return
    state = load_checkpoint(path)
    _check_same_run(state.get("config", {}), config, path)
    saved_dataset = state.get("dataset", {})
    if saved_dataset and saved_dataset != loop.dataset:
        raise CheckpointError(
            f"the images in {config.train.data_dir} changed since {path} was written "
            f"({saved_dataset.get('images')} readable images then, {loop.dataset['images']} now); "
            "resuming would silently change the run. Restore the folder or start a new run"
        )
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    loop.step, loop.epoch = int(state["step"]), int(state["epoch"])
    if loop.epoch > config.train.epochs or (
        loop.epoch == config.train.epochs and int(state["batch_in_epoch"]) > 0
    ):
        raise ConfigError(
            f"{run_dir} has already trained {loop.epoch} epochs, more than --epochs "
            f"{config.train.epochs}; pass a larger --epochs to extend it, or leave --epochs "
            "out to finish the run as planned"
        )
    loop.batch_in_epoch = int(state["batch_in_epoch"])
    loop.last_loss = float(state.get("last_loss", math.nan))
    loop.epoch_mean_loss = float(state.get("epoch_mean_loss", math.nan))
    metrics.truncate_after(loop.step)
    if loop.epoch >= config.train.epochs:
        reporter.message(
            f"resumed at step {loop.step}: all {config.train.epochs} epochs were already trained"
        )
    else:
        reporter.message(
            f"resumed at step {loop.step} (epoch {loop.epoch + 1} of {config.train.epochs}, "
            f"batch {loop.batch_in_epoch})"
        )


def _say_if_precision_changed(
    records: list[dict[str, Any]], precision: Precision, device: torch.device, reporter: Reporter
) -> None:
    """Say so when a resumed run continues in another precision than it trained in.

    `--precision auto` is kept as `auto` and resolved on every start (on the machine the run
    resumes on, with that release's rule), so the same run may switch between fp32 and
    bf16; --precision itself cannot change on resume, so the environment pin is the way back.
    """
    starts = [record for record in records if record.get("kind") == "start"]
    before = starts[-1].get("precision") if starts else None
    if before is None or before == precision.name:
        return
    pin = ""
    if device.type == "cpu" and before in ("fp32", "bf16"):
        pin = f"; SIMCLR_CPU_BF16={1 if before == 'bf16' else 0} keeps {before} on this CPU"
    reporter.message(
        f"precision: this run trained in {before} until now and continues in {precision.name} "
        f"(--precision auto resolves on each start{pin})"
    )


def _check_same_run(saved: dict[str, Any], config: RunConfig, path: Path) -> None:
    current = config.to_dict()
    defaults = RunConfig().to_dict()  # settings added since the checkpoint had their default
    differences = [
        f"{part}.{key}"
        for part, values in current.items()
        for key, value in values.items()
        # The folder is wherever the run is now: runs may be moved, or were recorded
        # relative to the directory they started in (before out_dir was made absolute).
        if not (part == "train" and (key in RESUMABLE_FIELDS or key == "out_dir"))
        and _plain(saved.get(part, {}).get(key, defaults[part][key])) != _plain(value)
    ]
    if differences:
        raise CheckpointError(
            f"{path} was written by a run with different settings ({', '.join(differences)}); "
            "resuming would silently change the run"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _train(
    loop: _Loop,
    config: RunConfig,
    data: ImageBatches,
    *,
    device: torch.device,
    precision: Precision,
    run_dir: Path,
    metrics: MetricsLog,
    reporter: Reporter,
    context: DistContext,
) -> None:
    """Run epochs from the loop's position until done or interrupted."""
    train = config.train
    num_images = len(data.readable_indices)
    if min(train.global_batch_size, num_images) < context.world_size:
        raise ConfigError(
            f"a batch of {min(train.global_batch_size, num_images)} images cannot be shared by "
            f"{context.world_size} processes; use a larger --batch-size or fewer processes"
        )
    # Processes, chunks and frozen encoder batch norm take the general step; else the plain one.
    parallel = (
        context.enabled or train.chunk_size is not None or train.encoder_batchnorm == "frozen"
    )
    steps_per_epoch = batches_per_epoch(num_images, train.global_batch_size)
    total_steps = steps_per_epoch * train.epochs
    schedule = {
        "peak_lr": resolved_lr(config.optim, train.global_batch_size),
        "total_steps": total_steps,
        "warmup_steps": warmup_steps(
            config.optim, epochs=train.epochs, steps_per_epoch=steps_per_epoch
        ),
    }
    reporter.start(task="pretrain", total=total_steps, completed=loop.step)
    last_save = time.monotonic()
    try:
        while loop.epoch < train.epochs and not loop.interrupted:
            whole_epoch, steps_before = loop.batch_in_epoch == 0, loop.step
            order = _epoch_order(
                train, loop.epoch, num_images=num_images, steps_per_epoch=steps_per_epoch
            )
            shard = EpochShard(order, train.global_batch_size, context, data.readable_indices)
            for batch in data.iterate(
                shard.local_order(loop.batch_in_epoch), batch_size=shard.share, keep_empty=True
            ):
                # Streamed folders learn which files are unreadable only now. A batch left
                # with one image has no negative, and one process's share with fewer than
                # two would break its batch-norm statistics, so every process passes over
                # that global batch together (empty batches are kept so all count alike).
                fewest = min(context.counts(len(batch.indices), device))
                if fewest < 2:
                    if context.is_main:
                        logger.warning(
                            "passing over a batch left with %d readable image(s) of %d%s; "
                            "SimCLR needs two",
                            fewest,
                            shard.share,
                            " in one process's share" if context.enabled else "",
                        )
                    loop.batch_in_epoch += 1
                    continue
                _step(
                    loop,
                    config,
                    batch,
                    device=device,
                    precision=precision,
                    schedule=schedule,
                    parallel=(context, shard) if parallel else None,
                )
                metrics.append(
                    {
                        "kind": "step",
                        "step": loop.step,
                        "epoch": loop.epoch + 1,
                        "loss": loop.last_loss,
                        "lr": loop.optimizer.param_groups[0]["lr"],
                        "images_per_s": loop.images_per_s,
                    }
                )
                reporter.advance(completed=loop.step, metrics=_shown(loop, epoch=loop.epoch + 1))
                if loop.interrupted:
                    break
                if time.monotonic() - last_save > train.checkpoint_minutes * 60:
                    if context.is_main:  # no collective here: the other ranks need not agree
                        _save(loop, config, run_dir)
                    last_save = time.monotonic()
            else:
                if whole_epoch and loop.step == steps_before:
                    raise DataError(
                        f"{train.data_dir}: no batch of an epoch held two readable images "
                        f"({data.skip_log.count} files could not be read); nothing was trained"
                    )
                _finish_epoch(loop, config, run_dir, metrics, reporter, context)
                last_save = time.monotonic()
        if loop.interrupted:
            if context.is_main:
                _save(loop, config, run_dir)
            reporter.message(
                f"interrupted: checkpoint saved at step {loop.step}; "
                f"continue with: simclr pretrain --resume {run_dir}"
            )
    finally:
        reporter.stop()


def _step(
    loop: _Loop,
    config: RunConfig,
    batch: Any,
    *,
    device: torch.device,
    precision: Precision,
    schedule: dict[str, Any],
    parallel: tuple[DistContext, EpochShard] | None = None,
) -> None:
    """One optimisation step on one batch of decoded canvases."""
    started = time.perf_counter()
    lr = learning_rate_at(loop.step, **schedule)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr
    if parallel is not None:
        seen = _parallel_step(loop, config, batch, device, precision, *parallel)
        loop.step += 1
        loop.batch_in_epoch += 1
        loop.images_per_s = seen / max(time.perf_counter() - started, 1e-9)
        return

    # Two views of every image, drawn from this step's own random stream.
    canvases = batch.canvases.to(device, non_blocking=True)
    generator = generator_for(config.train.seed, "augment", loop.step)
    # (2B, 3, S, S), channels-last: the first view of every image, then the second.
    images = make_view_batch(canvases, batch.sizes, config.augment, generator)

    # One forward over both views, so batch norm sees the whole batch; the loss runs in fp32.
    loop.model.train()
    with autocast(device, precision):
        projections = loop.model(images)  # (2B, P)
    half = images.shape[0] // 2
    loss = nt_xent_loss(projections[:half], projections[half:], config.train.temperature)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss became {loss.item()} at step {loop.step}; the last checkpoint was kept. "
            "Try a lower learning rate (--lr), a higher --temperature, or --precision fp32"
        )

    _backward_and_update(loop, loss)
    loop.last_loss = float(loss.detach())
    loop.step += 1
    loop.batch_in_epoch += 1
    loop.images_per_s = half / max(time.perf_counter() - started, 1e-9)


def _parallel_step(
    loop: _Loop,
    config: RunConfig,
    batch: Any,
    device: torch.device,
    precision: Precision,
    context: DistContext,
    shard: EpochShard,
) -> int:
    """The step across processes and/or in chunks; returns the images of the global batch."""
    rows = shard.rows(loop.batch_in_epoch, batch.indices) if context.enabled else None
    generator = generator_for(config.train.seed, "augment", loop.step)
    views = StepViews.draw(
        batch, config.augment, generator, device=device, rows=rows, global_rows=shard.global_rows
    )
    loop.model.train()
    if config.train.encoder_batchnorm == "frozen":
        freeze_batchnorm(loop.model.backbone)
    loop.optimizer.zero_grad(set_to_none=True)
    scaler = loop.scaler

    def check(loss: float) -> None:
        if not math.isfinite(loss):  # the same global value on every rank: all stop together
            raise NonFiniteLossError(
                f"the loss became {loss} at step {loop.step}; the last checkpoint was kept. "
                "Try a lower learning rate (--lr), a higher --temperature, or --precision fp32"
            )

    result = batch_gradients(
        loop.model,
        views,
        temperature=config.train.temperature,
        context=context,
        chunk_size=config.train.chunk_size,
        autocast=lambda: autocast(device, precision),
        scale=scaler.scale if scaler is not None else (lambda loss: loss),
        check=check,
        stop_requested=loop.stop_requested,
    )
    if scaler is not None:
        scaler.step(loop.optimizer)
        scaler.update()
    else:
        loop.optimizer.step()
    loop.last_loss = result.loss
    loop.interrupted = loop.interrupted or result.stop
    return result.images


def _epoch_order(
    train: TrainConfig, epoch: int, *, num_images: int, steps_per_epoch: int
) -> list[int]:
    """This epoch's shuffled image positions, from its own seeded stream."""
    order = torch.randperm(num_images, generator=generator_for(train.seed, "order", epoch))
    kept: list[int] = order[: steps_per_epoch * train.global_batch_size].tolist()
    return kept


def _backward_and_update(loop: _Loop, loss: torch.Tensor) -> None:
    """Gradients and one optimiser step; fp16 goes through the loss scaler."""
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.scaler is not None:
        loop.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loss.backward()  # type: ignore[no-untyped-call]
        loop.optimizer.step()


def _shown(loop: _Loop, *, epoch: int) -> dict[str, float]:
    return {
        "epoch": epoch,
        "loss": loop.last_loss,
        "lr": loop.optimizer.param_groups[0]["lr"],
        "img/s": loop.images_per_s,
    }


def _finish_epoch(
    loop: _Loop,
    config: RunConfig,
    run_dir: Path,
    metrics: MetricsLog,
    reporter: Reporter,
    context: DistContext,
) -> None:
    """Summarise the epoch, checkpoint, and redraw the loss curve."""
    # From the log, not memory: an epoch interrupted and resumed still averages all its steps.
    losses = [
        r["loss"] for r in metrics.read() if r["kind"] == "step" and r["epoch"] == loop.epoch + 1
    ]
    mean_loss = context.broadcast_object(sum(losses) / max(len(losses), 1))  # rank 0 logs
    loop.epoch += 1
    loop.batch_in_epoch = 0
    loop.epoch_mean_loss = mean_loss
    metrics.append({"kind": "epoch", "step": loop.step, "epoch": loop.epoch, "loss": mean_loss})
    if context.is_main:
        _save(loop, config, run_dir)
        # Drawing takes about half a second; with epochs of a few seconds (small folders)
        # redrawing every epoch would cost more than the checkpoint. The run's end draws it.
        if time.monotonic() - loop.plotted_at >= LOSS_PLOT_SECONDS:
            plot_loss_curve(metrics.read(), run_dir / "loss.png")
            loop.plotted_at = time.monotonic()
    reporter.message(
        f"epoch {loop.epoch}/{config.train.epochs}: mean loss {mean_loss:.4f}, step {loop.step}, "
        "checkpoint saved"
    )


def _save(loop: _Loop, config: RunConfig, run_dir: Path) -> None:
    """Atomically write the full training state; a failed write keeps the previous one."""
    state = {
        "config": config.to_dict(),
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else {},
        "step": loop.step,
        "epoch": loop.epoch,
        "batch_in_epoch": loop.batch_in_epoch,
        "last_loss": loop.last_loss,
        "epoch_mean_loss": loop.epoch_mean_loss,
        "dataset": loop.dataset,
    }
    save_training_checkpoint(run_dir / CHECKPOINT_RELATIVE_PATH, state)


class _NoMetrics(MetricsLog):
    """The log as ranks other than 0 see it: rank 0 alone writes `metrics.jsonl`."""

    def __init__(self) -> None:
        """Nothing to open."""
        super().__init__(Path(os.devnull))

    def append(self, record: dict[str, Any]) -> None:
        """Discard."""

    def read(self) -> list[dict[str, Any]]:
        """Nothing logged here."""
        return []

    def truncate_after(self, step: int) -> None:
        """Nothing to truncate."""


def _parallel_record(train: TrainConfig, context: DistContext) -> dict[str, Any]:
    """Processes, backend and batch-norm handling, logged in the start record."""
    return {
        "world_size": context.world_size,
        "dist_backend": context.backend or None,
        "sync_batchnorm": bool(context.enabled and train.sync_batchnorm),
        "per_process_batch": train.global_batch_size / context.world_size,
        "chunk_size": train.chunk_size,
        "encoder_batchnorm": train.encoder_batchnorm,
    }


def _parallel_banner(train: TrainConfig, context: DistContext) -> str:
    parts = []
    if context.enabled:
        bn = "synchronised" if train.sync_batchnorm else "per-process"
        parts.append(f"{context.world_size} processes ({context.backend}, {bn} batch norm)")
    if train.chunk_size is not None:
        parts.append(f"chunks of {train.chunk_size} images")
    if train.encoder_batchnorm == "frozen":
        parts.append("frozen encoder batch norm")
    return "".join(f" | {part}" for part in parts)
