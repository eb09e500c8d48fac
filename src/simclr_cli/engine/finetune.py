"""Semi-supervised fine-tuning: a pretrained encoder plus a linear head, trained on few labels.

As in the SimCLR paper's semi-supervised protocol (Chen et al. 2020, appendix): a
class-balanced subset of the labels (1% or 10% there), the whole network trained end to end
with cross-entropy, Nesterov-momentum SGD at lr = 0.05 x batch / 256, no warmup, no weight
decay, random resized crops and flips as the only augmentation. `from_scratch` trains the same
architecture from random initialisation on the same subset, so the gain from pretraining is
measured rather than assumed; `freeze_encoder` trains the head alone.

Phases mirror pretraining: run folder, labelled subset, network, resume, loop, test, export.
All randomness comes from named streams of the seed, so resume replays the same batches.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from simclr_cli import __version__
from simclr_cli.checkpoint import (
    load_checkpoint,
    save_exported_model,
    save_training_checkpoint,
)
from simclr_cli.config import AugmentConfig
from simclr_cli.data.augment import apply_view, center_view, normalize, sample_view_params
from simclr_cli.data.images import RUN_MARKER
from simclr_cli.data.labeled import LabeledImages, align_classes, balanced_subset, scan_labeled
from simclr_cli.data.loader import (
    ImageBatches,
    SkipLog,
    cache_fill_workers,
    default_num_workers,
)
from simclr_cli.device import Precision, autocast, resolve_device, resolve_precision
from simclr_cli.engine.interrupts import stop_on_signal
from simclr_cli.engine.metrics import MetricsLog, plot_loss_curve
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    os_error_reason,
)
from simclr_cli.models.backbone import Backbone
from simclr_cli.models.classifier import Classifier
from simclr_cli.models.export import CHECKPOINT_RELATIVE_PATH, load_model
from simclr_cli.optim import learning_rate_at
from simclr_cli.seeding import derive_seed, generator_for

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "resume_finetune_config"]

logger = logging.getLogger(__name__)

FINETUNE_CONFIG_NAME = "finetune_config.json"
# Settings a resumed run may change: they alter neither the network nor the batches.
RESUMABLE_FIELDS = frozenset(
    {"epochs", "device", "num_workers", "test_dir", "strict", "max_pixels"}
)


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run; saved as finetune_config.json in its folder."""

    train_dir: str
    out_dir: str
    model: str  # pretrained encoder; with from_scratch only its architecture is used
    test_dir: str | None = None
    from_scratch: bool = False
    freeze_encoder: bool = False
    label_fraction: float | None = 0.1
    labels_per_class: int | None = None
    epochs: int = 30  # the paper: 60 for 1% of ImageNet's labels, 30 for 10%
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum 0.9, the paper's) or "adamw"
    lr: float | None = None  # None: 0.05 x batch / 256 for SGD, 1e-3 for AdamW
    weight_decay: float = 0.0
    crop_min_area: float = 0.08
    flip_prob: float = 0.5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int | None = None
    strict: bool = False
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        """Reject values the run cannot honour, with the option to change."""
        if self.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
        if self.batch_size < 2:
            raise ConfigError("--batch-size must be at least 2 (batch norm needs two images)")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose sgd or adamw")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError("--lr must be positive")
        if self.weight_decay < 0:
            raise ConfigError("--weight-decay must be 0 or more")
        if not 0 < self.crop_min_area <= 1:
            raise ConfigError("--crop-min-area must be in (0, 1]")
        if not 0 <= self.flip_prob <= 1:
            raise ConfigError("--flip-prob must be in [0, 1]")
        if self.from_scratch and self.freeze_encoder:
            raise ConfigError(
                "--from-scratch with --freeze-encoder would train a random encoder's head only"
            )

    @property
    def peak_lr(self) -> float:
        """The learning rate at the start of the cosine schedule."""
        if self.lr is not None:
            return self.lr
        return 0.05 * self.batch_size / 256 if self.optimizer == "sgd" else 1e-3


@dataclass(frozen=True)
class FinetuneResult:
    """What a finished (or interrupted) fine-tuning run produced."""

    run_dir: Path
    step: int
    epochs_completed: int
    labelled_images: int
    class_names: list[str]
    test_accuracy: float | None  # None without a test folder
    test_images: int
    final_loss: float
    interrupted: bool
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Loop:
    network: Classifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only: bf16 and fp32 need no loss scaling
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    last_loss: float = math.nan
    epoch_mean_loss: float = math.nan
    interrupted: bool = False


def resume_finetune_config(run_dir: Path, **overrides: Any) -> FinetuneConfig:
    """A run's saved config with the safe settings changed; any other change is refused."""
    path = run_dir / FINETUNE_CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: not a fine-tuning run folder (no {FINETUNE_CONFIG_NAME})"
        )
    try:
        saved = FinetuneConfig(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: damaged or not a fine-tuning config ({type(error).__name__}); "
            "it cannot be resumed"
        ) from None
    # FinetuneConfig's fields are the command's options with dashes (lr -> --lr).
    refused = sorted(
        "--" + name.replace("_", "-")
        for name, value in overrides.items()
        if name not in RESUMABLE_FIELDS and value != getattr(saved, name)
    )
    if refused:
        raise ConfigError(
            f"cannot change {', '.join(refused)} when resuming a fine-tuning run; start a new "
            "run instead (resume may change --epochs, --device, --workers, --test, --strict "
            "and --max-pixels)"
        )
    safe = {k: v for k, v in overrides.items() if k in RESUMABLE_FIELDS}
    return replace(saved, out_dir=str(run_dir), **safe)


def finetune(
    config: FinetuneConfig, *, reporter: Reporter | None = None, resume: bool = False
) -> FinetuneResult:
    """Fine-tune (or resume), test, and export a classifier; see the module docstring."""
    reporter = reporter or NullReporter()
    started = time.monotonic()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    run_dir = Path(config.out_dir)

    # Labelled subset, the same for every seed-equal run (and for --from-scratch).
    everything = scan_labeled(Path(config.train_dir))
    if everything.empty_classes:
        logger.warning(
            "empty class folder(s) in the training folder, left out of the classifier: %s",
            ", ".join(everything.empty_classes),
        )
    labelled = balanced_subset(
        everything,
        fraction=config.label_fraction if config.labels_per_class is None else None,
        per_class=config.labels_per_class,
        seed=config.seed,
    )
    num_classes = len(labelled.class_names)
    if num_classes < 2:
        raise DataError(f"{config.train_dir}: found one class; classification needs at least two")
    pretrained = load_model(config.model)
    preprocessing = pretrained.config["preprocessing"]
    skip_log = SkipLog(strict=config.strict)
    data = ImageBatches(
        labelled.paths,
        canvas_size=int(preprocessing["decode_size"]),
        num_workers=config.num_workers if config.num_workers is not None else default_num_workers(),
        skip_log=skip_log,
        max_pixels=config.max_pixels,
    )
    reporter.message(
        f"fine-tuning on {len(labelled)} labelled images ({_subset_text(config, everything)}) of "
        f"{len(everything)}, {num_classes} classes"
    )
    # A labelled subset is small; decode it once.
    data.cache(num_workers=cache_fill_workers(config.num_workers))
    if len(data.readable_indices) < 2:
        raise DataError(f"{config.train_dir}: fewer than two readable labelled images")
    labels = torch.tensor(labelled.labels, dtype=torch.long)

    _prepare_run_dir(config, run_dir, resume=resume)
    network = _initial_network(config, pretrained.backbone, num_classes).to(device)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    loop = _Loop(network=network, optimizer=_optimizer(config, network), scaler=scaler)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if resume:
        _restore(loop, config, run_dir, metrics, reporter)
    metrics.append(
        {
            "kind": "start",
            "step": loop.step,
            "simclr_version": __version__,
            "device": str(device),
            "precision": precision.name,
            "labelled_images": len(data.readable_indices),
            "classes": labelled.class_names,
            "peak_lr": config.peak_lr,
        }
    )
    augment = AugmentConfig(
        image_size=int(pretrained.config["image_size"]),
        crop_area=(config.crop_min_area, 1.0),
        flip_prob=config.flip_prob,
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=0.0,
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
    )

    with stop_on_signal(loop):
        _train(loop, config, data, labels, augment, device, precision, run_dir, metrics, reporter)
    plot_loss_curve(
        metrics.read(), run_dir / "loss.png", title="fine-tuning", loss_name="cross-entropy"
    )

    test_accuracy, test_images = None, 0
    if not loop.interrupted:
        if config.test_dir:
            test_accuracy, test_images = _test(
                loop.network,
                config,
                labelled.class_names,
                pretrained.config,
                device,
                precision,
                skip_log=skip_log,
            )
            metrics.append(
                {
                    "kind": "test",
                    "step": loop.step,
                    "accuracy": test_accuracy,
                    "images": test_images,
                }
            )
        _export(loop, config, pretrained.config, labelled, run_dir, test_accuracy)
    return FinetuneResult(
        run_dir=run_dir,
        step=loop.step,
        epochs_completed=loop.epoch,
        labelled_images=len(data.readable_indices),
        class_names=labelled.class_names,
        test_accuracy=test_accuracy,
        test_images=test_images,
        final_loss=loop.epoch_mean_loss,
        interrupted=loop.interrupted,
        skipped=dict(skip_log.skipped),
        seconds=time.monotonic() - started,
    )


def _subset_text(config: FinetuneConfig, available: LabeledImages) -> str:
    if config.labels_per_class is not None:
        smallest = min(count for count in available.counts().values() if count)
        if smallest < config.labels_per_class:
            return (
                f"{config.labels_per_class} per class asked; classes with fewer, the smallest "
                f"has {smallest}, keep all theirs"
            )
        return f"{config.labels_per_class} per class"
    return f"{100 * (config.label_fraction or 0):g}% of each class"


def _prepare_run_dir(config: FinetuneConfig, run_dir: Path, *, resume: bool) -> None:
    config_path = run_dir / FINETUNE_CONFIG_NAME
    if not resume and config_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a fine-tuning run; continue it with --resume {run_dir} "
            "or pick another --out"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_MARKER).write_text("simclr-cli run folder; not scanned as input\n")
        if not resume:
            text = json.dumps(asdict(config), indent=2) + "\n"
            config_path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot write to the run folder {run_dir}: {os_error_reason(error)}"
        ) from None


def _initial_network(config: FinetuneConfig, pretrained: Backbone, num_classes: int) -> Classifier:
    """The pretrained encoder (or a seeded random one of its shape) and a seeded new head."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, "finetune-init"))
        if config.from_scratch:
            backbone = Backbone(pretrained.arch, small_stem=pretrained.small_stem)
        else:
            backbone = pretrained
        network = Classifier(backbone, num_classes)
    if config.freeze_encoder:
        network.backbone.requires_grad_(False)
    return network.to(memory_format=torch.channels_last)


def _optimizer(config: FinetuneConfig, network: Classifier) -> torch.optim.Optimizer:
    params = [p for p in network.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.peak_lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)


def _restore(
    loop: _Loop, config: FinetuneConfig, run_dir: Path, metrics: MetricsLog, reporter: Reporter
) -> None:
    path = run_dir / CHECKPOINT_RELATIVE_PATH
    if not path.is_file():
        reporter.message(f"{run_dir}: no checkpoint yet; starting this run from step 0")
        metrics.truncate_after(0)
        return
    state = load_checkpoint(path)
    loop.network.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    loop.step, loop.epoch = int(state["step"]), int(state["epoch"])
    loop.batch_in_epoch = int(state["batch_in_epoch"])
    loop.last_loss = float(state.get("last_loss", math.nan))
    loop.epoch_mean_loss = float(state.get("epoch_mean_loss", math.nan))
    if loop.epoch > config.epochs:
        raise ConfigError(
            f"{run_dir} has already trained {loop.epoch} epochs; ask for at least that many"
        )
    metrics.truncate_after(loop.step)
    if loop.epoch >= config.epochs:
        reporter.message(f"resumed at step {loop.step}: all {config.epochs} epochs were trained")
    else:
        reporter.message(f"resumed at step {loop.step} (epoch {loop.epoch + 1} of {config.epochs})")


def _epoch_batches(config: FinetuneConfig, epoch: int, num_images: int) -> list[list[int]]:
    """This epoch's shuffled batches; a last batch of one image is dropped (batch norm)."""
    order = torch.randperm(
        num_images, generator=generator_for(config.seed, "finetune-order", epoch)
    )
    batches = [
        order[i : i + config.batch_size].tolist() for i in range(0, num_images, config.batch_size)
    ]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def _train(
    loop: _Loop,
    config: FinetuneConfig,
    data: ImageBatches,
    labels: torch.Tensor,
    augment: AugmentConfig,
    device: torch.device,
    precision: Precision,
    run_dir: Path,
    metrics: MetricsLog,
    reporter: Reporter,
) -> None:
    num_images = len(data.readable_indices)
    steps_per_epoch = len(_epoch_batches(config, 0, num_images))
    total_steps = steps_per_epoch * config.epochs
    reporter.start(task="finetune", total=total_steps, completed=loop.step)
    try:
        while loop.epoch < config.epochs and not loop.interrupted:
            batches = _epoch_batches(config, loop.epoch, num_images)
            for positions in batches[loop.batch_in_epoch :]:
                batch = next(data.iterate(positions, batch_size=len(positions)))
                lr = learning_rate_at(
                    loop.step, peak_lr=config.peak_lr, total_steps=total_steps, warmup_steps=0
                )
                loss = _step(loop, config, batch, labels, augment, device, precision, lr)
                metrics.append(
                    {
                        "kind": "step",
                        "step": loop.step,
                        "epoch": loop.epoch + 1,
                        "loss": loss,
                        "lr": lr,
                    }
                )
                reporter.advance(
                    completed=loop.step, metrics={"epoch": loop.epoch + 1, "loss": loss, "lr": lr}
                )
                if loop.interrupted:
                    break
            else:
                losses = [
                    r["loss"]
                    for r in metrics.read()
                    if r["kind"] == "step" and r["epoch"] == loop.epoch + 1
                ]
                loop.epoch += 1
                loop.batch_in_epoch = 0
                loop.epoch_mean_loss = sum(losses) / max(len(losses), 1)
                metrics.append(
                    {
                        "kind": "epoch",
                        "step": loop.step,
                        "epoch": loop.epoch,
                        "loss": loop.epoch_mean_loss,
                    }
                )
                _save(loop, config, run_dir)
        if loop.interrupted:
            _save(loop, config, run_dir)
            reporter.message(
                f"interrupted: checkpoint saved at step {loop.step}; "
                f"continue with: simclr finetune --resume {run_dir}"
            )
    finally:
        reporter.stop()


def _step(
    loop: _Loop,
    config: FinetuneConfig,
    batch: Any,
    labels: torch.Tensor,
    augment: AugmentConfig,
    device: torch.device,
    precision: Precision,
    lr: float,
) -> float:
    for group in loop.optimizer.param_groups:
        group["lr"] = lr

    # One random resized crop (and flip) per image, from this step's own stream.
    canvases = batch.canvases.to(device, non_blocking=True)
    generator = generator_for(config.seed, "finetune-augment", loop.step)
    params = sample_view_params(augment, batch.sizes.cpu(), generator)
    images = normalize(apply_view(canvases, params.to(device), augment), augment)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = labels[batch.indices].to(device)

    # A frozen encoder keeps its batch-norm statistics: eval mode, no gradients.
    loop.network.train()
    if config.freeze_encoder:
        loop.network.backbone.eval()
    with autocast(device, precision):
        logits = loop.network(images)  # (B, C)
    loss = F.cross_entropy(logits.float(), targets)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"the loss became {loss.item()} at step {loop.step}; the last checkpoint was kept. "
            "Try a lower --lr or --precision fp32"
        )
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.scaler is not None:
        loop.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loss.backward()  # type: ignore[no-untyped-call]
        loop.optimizer.step()
    loop.step += 1
    loop.batch_in_epoch += 1
    loop.last_loss = float(loss.detach())
    return loop.last_loss


def _save(loop: _Loop, config: FinetuneConfig, run_dir: Path) -> None:
    state = {
        "config": asdict(config),
        "model": loop.network.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else {},
        "step": loop.step,
        "epoch": loop.epoch,
        "batch_in_epoch": loop.batch_in_epoch,
        "last_loss": loop.last_loss,
        "epoch_mean_loss": loop.epoch_mean_loss,
    }
    save_training_checkpoint(run_dir / CHECKPOINT_RELATIVE_PATH, state)


@torch.no_grad()
def _test(
    network: Classifier,
    config: FinetuneConfig,
    class_names: list[str],
    model_config: dict[str, Any],
    device: torch.device,
    precision: Precision,
    *,
    skip_log: SkipLog,
) -> tuple[float, int]:
    """Top-1 accuracy on the test folder, evaluation view (resize + centre crop).

    Unreadable test images are recorded in `skip_log`, with the training set's.
    """
    train_names = LabeledImages([], [], class_names)
    _, test, warnings = align_classes(train_names, scan_labeled(Path(config.test_dir or "")))
    for warning in warnings:
        if "no test images" not in warning:
            logger.warning(warning)
    preprocessing = model_config["preprocessing"]
    data = ImageBatches(
        test.paths,
        canvas_size=int(preprocessing["decode_size"]),
        num_workers=config.num_workers if config.num_workers is not None else default_num_workers(),
        skip_log=skip_log,
        max_pixels=config.max_pixels,
    )
    mean = torch.tensor(preprocessing["mean"], device=device)[None, :, None, None]
    std = torch.tensor(preprocessing["std"], device=device)[None, :, None, None]
    # Test classes unknown to the classifier get an index it can never predict.
    known = {name: i for i, name in enumerate(class_names)}
    truth = torch.tensor([known.get(test.class_names[y], -1) for y in test.labels])
    network.eval()
    correct = total = 0
    for batch in data.iterate(range(len(data.readable_indices)), batch_size=256):
        images = center_view(
            batch.canvases.to(device), batch.sizes, size=int(model_config["image_size"])
        )
        images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            predicted = network(images).argmax(dim=1).cpu()
        correct += int((predicted == truth[batch.indices]).sum())
        total += len(batch.indices)
    if total == 0:
        raise DataError(f"{config.test_dir}: none of the test images could be read")
    return correct / total, total


def _export(
    loop: _Loop,
    config: FinetuneConfig,
    model_config: dict[str, Any],
    labelled: LabeledImages,
    run_dir: Path,
    test_accuracy: float | None,
) -> None:
    keep = ("arch", "small_stem", "feature_dim", "image_size", "preprocessing")
    exported = {key: model_config[key] for key in keep}
    exported.update(
        {
            "task": "classification",
            "class_names": labelled.class_names,
            "training": {
                "finetuned_from": None if config.from_scratch else config.model,
                "from_scratch": config.from_scratch,
                "freeze_encoder": config.freeze_encoder,
                "labelled_images": len(labelled),
                "label_fraction": config.label_fraction
                if config.labels_per_class is None
                else None,
                "labels_per_class": config.labels_per_class,
                "epochs": config.epochs,
                "steps": loop.step,
                "test_accuracy": test_accuracy,
                "dataset": config.train_dir,
            },
        }
    )
    try:
        save_exported_model(run_dir, loop.network.state_dict(), exported)
    except OSError as error:
        raise CheckpointError(
            f"could not write the classifier to {run_dir} ({os_error_reason(error)}); the last "
            f"checkpoint is intact: free some space, then export it with "
            f"simclr finetune --resume {run_dir}"
        ) from None
