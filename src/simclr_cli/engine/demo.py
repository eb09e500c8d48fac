"""The built-in demo: pretrain on real digits, then show what pretraining bought.

It pretrains a small SimCLR model on the 4,000 training digits of the built-in MNIST subset
(labels unused), then classifies the 1,000 held-out digits by kNN on frozen features, for the
pretrained encoder and for the very same encoder at its random initialisation, in one run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from simclr_cli.config import AugmentConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from simclr_cli.data.builtin import MNIST_ATTRIBUTION, write_mnist_folders
from simclr_cli.data.labeled import align_classes, scan_labeled
from simclr_cli.device import resolve_device, resolve_precision
from simclr_cli.engine.features import labeled_features
from simclr_cli.engine.knn import knn_top1
from simclr_cli.engine.pretrain import initial_model, pretrain
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.models.export import LoadedModel, load_model

__all__ = ["DemoResult", "demo_config", "run_demo"]

CROP_MIN_AREA = 0.2


@dataclass(frozen=True)
class DemoResult:
    """kNN top-1 accuracy on held-out digits before and after pretraining."""

    dataset: str
    run_dir: Path
    train_images: int
    test_images: int
    knn_random_init: float
    knn_pretrained: float
    pretrain_seconds: float
    final_loss: float
    # Ctrl-C stopped pretraining: its checkpoint is saved and knn_pretrained is nan, since a
    # partly trained encoder would be reported as the demo's result.
    interrupted: bool = False

    @property
    def gain(self) -> float:
        """Accuracy points gained by pretraining."""
        return 100 * (self.knn_pretrained - self.knn_random_init)


def demo_config(
    train_dir: Path, run_dir: Path, *, epochs: int, device: str, seed: int
) -> RunConfig:
    """A configuration sized for a few minutes on two CPU cores (benchmarks: docs/demo.md).

    Digits are small and grey, and a mirrored digit is another symbol: the views are 16 px,
    never flipped, with half-strength colour jitter and crops of 20-100% of the image. In runs
    this short AdamW at a fixed 1e-3 learned far faster than LARS at the paper's rate.
    """
    return RunConfig(
        augment=AugmentConfig(
            image_size=16, crop_area=(CROP_MIN_AREA, 1.0), flip_prob=0.0, jitter_strength=0.5
        ),
        model=ModelConfig(arch="resnet18"),
        optim=OptimConfig(optimizer="adamw", base_lr=1e-3, lr_scaling="none", warmup_epochs=1),
        train=TrainConfig(
            data_dir=str(train_dir),
            out_dir=str(run_dir),
            epochs=epochs,
            global_batch_size=128,
            temperature=0.2,
            seed=seed,
            device=device,
            # fp32 everywhere, so the demo's numbers compare across CPUs (`auto` would train
            # in bf16 where AMX exists). CPU families still pick different fp32 kernels, so
            # the last digit moves: 93.4% on the machine the docs quote, 92.9% on an AMX Xeon.
            precision="fp32",
        ),
    )


def run_demo(
    out_dir: Path,
    *,
    epochs: int = 12,
    device: str = "auto",
    seed: int = 0,
    reporter: Reporter | None = None,
) -> DemoResult:
    """Lay out the digits, pretrain, and compare kNN accuracy with the random initialisation."""
    reporter = reporter or NullReporter()
    out_dir = out_dir.absolute()  # the run config records where its data lives
    train_dir, test_dir = write_mnist_folders(out_dir / "mnist")
    run_dir = out_dir / f"run-seed{seed}-{epochs}ep"
    config = demo_config(train_dir, run_dir, epochs=epochs, device=device, seed=seed)
    resume = (run_dir / "run_config.json").is_file()
    if resume:
        # Same settings as before: continue (or reuse) that run rather than refusing it.
        config = replace(config, train=replace(config.train, out_dir=str(run_dir)))

    random_init = initial_model(config)
    reporter.message("kNN with the randomly initialised encoder (the baseline)")
    baseline = _knn_accuracy(random_init, train_dir, test_dir, device=device, reporter=reporter)
    result = pretrain(config, reporter=reporter, resume=resume)
    pretrained = math.nan
    if not result.interrupted:
        reporter.message("kNN with the pretrained encoder")
        pretrained = _knn_accuracy(
            load_model(run_dir), train_dir, test_dir, device=device, reporter=reporter
        )
    return DemoResult(
        dataset=MNIST_ATTRIBUTION,
        run_dir=run_dir,
        train_images=result.num_images,
        test_images=_count(test_dir),
        knn_random_init=baseline,
        knn_pretrained=pretrained,
        pretrain_seconds=result.seconds,
        final_loss=result.final_loss,
        interrupted=result.interrupted,
    )


def _count(folder: Path) -> int:
    return len(scan_labeled(folder).paths)


def _knn_accuracy(
    model: LoadedModel, train_dir: Path, test_dir: Path, *, device: str, reporter: Reporter
) -> float:
    """Weighted kNN (k=20, t=0.1) of the test digits against the training digits."""
    torch_device = resolve_device(device)
    precision = resolve_precision("fp32", torch_device)
    train, test, _ = align_classes(scan_labeled(train_dir), scan_labeled(test_dir))
    bank, queries = (
        labeled_features(
            split, model=model, kind="encoder", device=torch_device, precision=precision
        )
        for split in (train, test)
    )
    return knn_top1(
        bank.features,
        bank.labels,
        queries.features,
        queries.labels,
        num_classes=len(train.class_names),
    )
