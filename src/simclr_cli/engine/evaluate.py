"""How good are the frozen features? kNN and linear-probe accuracy on a labelled folder.

Phases: class map shared by both splits, features (cached), the sanity check that encoding
left the encoder bit-identical, kNN for each k and voting rule, the linear probe, baselines
(the same architecture at random initialisation, raw pixels) through the very same code,
then `eval.json` and a confusion-matrix picture.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simclr_cli import __version__
from simclr_cli.checkpoint import atomic_write
from simclr_cli.data.images import RUN_MARKER
from simclr_cli.data.labeled import LabeledImages, align_classes, scan_labeled, stratified_split
from simclr_cli.device import resolve_device, resolve_precision
from simclr_cli.engine.features import (
    PIXEL_BASELINE_SIZE,
    FeatureSet,
    default_cache_dir,
    labeled_features,
)
from simclr_cli.engine.knn import knn_predict, topk_accuracy
from simclr_cli.engine.linear_probe import DEFAULT_WEIGHT_DECAYS, select_and_fit
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.errors import ConfigError, DataError, SimclrError, os_error_reason
from simclr_cli.models.backbone import Backbone
from simclr_cli.models.export import LoadedModel, load_model, state_fingerprint
from simclr_cli.seeding import derive_seed

__all__ = ["BASELINES", "EvalOptions", "EvalResult", "evaluate", "random_init_like"]

logger = logging.getLogger(__name__)

BASELINES = ("random", "pixels")


@dataclass(frozen=True)
class EvalOptions:
    """Every setting of an evaluation; all of them are recorded in eval.json."""

    knn_ks: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.1
    val_fraction: float = 0.2  # held out of the training folder when no test folder is given
    probe_val_fraction: float = 0.2  # held out of the training split to pick the probe's L2
    probe_weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    baselines: tuple[str, ...] = ()
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    num_workers: int | None = None
    strict: bool = False
    max_pixels: int | None = None
    use_cache: bool = True
    cache_dir: Path | None = None  # None: default_cache_dir()


@dataclass
class EvalResult:
    """Accuracies per feature source ("model", "random", "pixels") and where files went."""

    results: dict[str, dict[str, Any]]
    class_names: list[str]
    train_images: int
    test_images: int
    test_kind: str  # "test folder" or "validation split"
    out_dir: Path
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable file -> reason


def random_init_like(model: LoadedModel, *, seed: int) -> LoadedModel:
    """The same architecture and preprocessing at a seeded random initialisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "baseline-init"))
        backbone = Backbone(model.config["arch"], small_stem=bool(model.config["small_stem"]))
    return LoadedModel(backbone, None, model.config)


def evaluate(
    model_ref: str | Path,
    train_dir: Path,
    *,
    test_dir: Path | None = None,
    out_dir: Path,
    options: EvalOptions | None = None,
    reporter: Reporter | None = None,
) -> EvalResult:
    """Evaluate the encoder at `model_ref` on labelled folders; see the module docstring."""
    options = options or EvalOptions()
    reporter = reporter or NullReporter()
    started = time.monotonic()
    unknown = sorted(set(options.baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(
            f"unknown --baseline {', '.join(unknown)}; choose {' or '.join(BASELINES)}"
        )
    if not options.knn_ks or min(options.knn_ks) < 1:
        raise ConfigError("every -k (kNN neighbours) must be at least 1")
    # exp(similarity / t) with t <= 0 ranks the least similar neighbours highest.
    if not options.knn_temperature > 0:
        raise ConfigError(f"--knn-temperature must be positive, got {options.knn_temperature:g}")
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    model = load_model(model_ref)

    # Phase 1: one class map for both splits.
    train, test, warnings, test_kind = _splits(train_dir, test_dir, options, out_dir=out_dir)
    for warning in warnings:
        logger.warning(warning)
    num_classes = len(train.class_names)
    if num_classes < 2:
        raise DataError(f"{train_dir}: found one class; classification needs at least two")

    # Phase 2: features of each source, the encoder checked unchanged around its encoding.
    sources: dict[str, tuple[LoadedModel, str]] = {"model": (model, "encoder")}
    if "random" in options.baselines:
        sources["random"] = (random_init_like(model, seed=options.seed), "encoder")
    if "pixels" in options.baselines:
        sources["pixels"] = (model, "pixels")
    cache_dir = (options.cache_dir or default_cache_dir()) if options.use_cache else None
    results: dict[str, dict[str, Any]] = {}
    confusion: list[list[int]] = []
    skipped: dict[str, str] = {}
    counts: dict[str, int] = {}
    per_class: dict[str, dict[str, int]] = {}
    for name, (source_model, kind) in sources.items():
        before = state_fingerprint(source_model.backbone)
        features = {}
        for split_name, split in (("train", train), ("test", test)):
            reporter.message(f"{name}: features of {len(split)} {split_name} images")
            features[split_name] = labeled_features(
                split,
                model=source_model,
                kind=kind,
                device=device,
                precision=precision,
                batch_size=options.batch_size,
                num_workers=options.num_workers,
                max_pixels=options.max_pixels,
                strict=options.strict,
                cache_dir=cache_dir,
                model_fingerprint=before,
            )
            skipped.update(features[split_name].skipped)
        if state_fingerprint(source_model.backbone) != before:
            raise SimclrError(
                "the encoder's weights or batch-norm statistics changed while computing "
                "features; the evaluation would not describe the model. Please report this"
            )
        counts = {"train": len(features["train"].labels), "test": len(features["test"].labels)}
        # Per class as evaluated: unreadable files are not in the features.
        per_class = {
            split_name: {
                class_name: int((features[split_name].labels == label).sum())
                for label, class_name in enumerate(train.class_names)
            }
            for split_name in ("train", "test")
        }

        if name == "model":
            for key, where, role, split in (
                ("train", "training split", "training", train),
                ("test", test_kind, "test", test),
            ):
                found = split.counts()
                lost = [c for c, usable in per_class[key].items() if usable == 0 and found[c] > 0]
                if lost:
                    warning = (
                        f"class folder(s) whose every image was unreadable in the {where}: "
                        f"{', '.join(lost)} (the skipped files are listed above); these classes "
                        f"are scored without any {role} image"
                    )
                    logger.warning(warning)
                    warnings.append(warning)

        # Phases 3-4: kNN and linear probe on the same features.
        reporter.message(f"{name}: kNN and linear probe")
        results[name] = _score(features["train"], features["test"], num_classes, options)
        results[name]["features"] = {
            "kind": kind,
            "dim": int(features["train"].features.shape[1]),
            "from_cache": features["train"].from_cache and features["test"].from_cache,
        }
        if name == "model":
            confusion = results[name]["linear"].pop("confusion_matrix")
        else:
            results[name]["linear"].pop("confusion_matrix")

    # Phase 5: the record and the picture.
    record = _record(
        model_ref=model_ref,
        model=model,
        train_dir=train_dir,
        test_dir=test_dir,
        test_kind=test_kind,
        train=train,
        test=test,
        counts=counts,
        per_class=per_class,
        skipped=skipped,
        warnings=warnings,
        options=options,
        results=results,
        confusion=confusion,
        seconds=time.monotonic() - started,
    )
    _write_outputs(out_dir, record, confusion, train.class_names)
    return EvalResult(
        results=results,
        class_names=train.class_names,
        train_images=counts["train"],
        test_images=counts["test"],
        test_kind=test_kind,
        out_dir=out_dir,
        warnings=warnings,
        seconds=time.monotonic() - started,
        skipped=skipped,
    )


def _splits(
    train_dir: Path, test_dir: Path | None, options: EvalOptions, *, out_dir: Path
) -> tuple[LabeledImages, LabeledImages, list[str], str]:
    # -o inside a labelled folder must not become a class holding confusion.png.
    train = scan_labeled(train_dir, exclude=[out_dir])
    if test_dir is not None:
        test = scan_labeled(test_dir, exclude=[out_dir])
        train, test, warnings = align_classes(train, test)
        return train, test, warnings, "test folder"
    warnings = []
    if train.empty_classes:
        warnings.append(f"empty class folder(s): {', '.join(train.empty_classes)}")
    train, test = stratified_split(train, options.val_fraction, seed=options.seed)
    if len(test) == 0:
        raise DataError(
            f"{train_dir}: too few images to hold out a validation split of "
            f"{options.val_fraction:g} (each class needs two images to spare one); "
            "give a test folder with --test, or more images"
        )
    return train, test, warnings, "validation split"


def _score(
    train: FeatureSet, test: FeatureSet, num_classes: int, options: EvalOptions
) -> dict[str, Any]:
    """Nearest-neighbour votes for every k and both rules, then the linear probe."""
    with_top5 = num_classes >= 5
    knn: dict[str, dict[str, float]] = {}
    for k in options.knn_ks:
        for rule, temperature in (("weighted", options.knn_temperature), ("majority", None)):
            scores = knn_predict(
                train.features,
                train.labels,
                test.features,
                num_classes=num_classes,
                k=k,
                temperature=temperature,
            )
            entry = {"top1": topk_accuracy(scores, test.labels, 1)}
            if with_top5:
                entry["top5"] = topk_accuracy(scores, test.labels, 5)
            entry["k_used"] = min(k, len(train.labels))
            knn[f"k{k}_{rule}"] = entry

    probe_train, probe_val = _probe_split(train, options)
    probe, val_accuracies = select_and_fit(
        probe_train.features,
        probe_train.labels,
        probe_val.features,
        probe_val.labels,
        num_classes=num_classes,
        weight_decays=options.probe_weight_decays,
    )
    logits = probe.scores(test.features)
    predicted = logits.argmax(dim=1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((test.labels, predicted), torch.ones_like(predicted), accumulate=True)
    linear: dict[str, Any] = {"top1": topk_accuracy(logits, test.labels, 1)}
    if with_top5:
        # Logits can be negative; shift so every class counts as "scored" for top-5.
        linear["top5"] = topk_accuracy(logits - logits.min() + 1, test.labels, 5)
    linear.update(
        {
            "weight_decay": probe.weight_decay,
            "validation_accuracy_by_weight_decay": {
                str(wd): acc for wd, acc in val_accuracies.items()
            },
            "iterations": probe.iterations,
            "converged": probe.converged,
            "gradient_max_abs": probe.gradient_norm,
            "confusion_matrix": confusion.tolist(),
        }
    )
    return {"knn": knn, "linear": linear}


def _probe_split(train: FeatureSet, options: EvalOptions) -> tuple[FeatureSet, FeatureSet]:
    """Hold out part of the training features to choose the probe's L2 strength."""
    images = LabeledImages(
        train.paths, train.labels.tolist(), [str(i) for i in range(int(train.labels.max()) + 1)]
    )
    fit, val = stratified_split(images, options.probe_val_fraction, seed=options.seed + 1)
    position = {path: i for i, path in enumerate(train.paths)}

    def take(part: LabeledImages) -> FeatureSet:
        rows = torch.tensor([position[p] for p in part.paths], dtype=torch.long)
        return FeatureSet(train.features[rows], train.labels[rows], part.paths, {}, False)

    return take(fit), take(val)


def _record(
    *,
    model_ref: str | Path,
    model: LoadedModel,
    train_dir: Path,
    test_dir: Path | None,
    test_kind: str,
    train: LabeledImages,
    test: LabeledImages,
    counts: dict[str, int],
    per_class: dict[str, dict[str, int]],
    skipped: dict[str, str],
    warnings: list[str],
    options: EvalOptions,
    results: dict[str, dict[str, Any]],
    confusion: list[list[int]],
    seconds: float,
) -> dict[str, Any]:
    """eval.json: every number and every setting that produced it."""
    return {
        "simclr_version": __version__,
        "torch_version": torch.__version__,
        "model": str(model_ref),
        "model_arch": model.config["arch"],
        "model_training": model.config.get("training", {}),
        "image_size": model.image_size,
        "preprocessing": model.config["preprocessing"],
        "data": {
            "train_dir": str(Path(train_dir).absolute()),
            "test_dir": str(Path(test_dir).absolute()) if test_dir else None,
            "evaluated_on": test_kind,
            "val_fraction": options.val_fraction if test_dir is None else None,
            "classes": train.class_names,
            "train_images": counts.get("train", 0),
            "test_images": counts.get("test", 0),
            "train_per_class": per_class.get("train", train.counts()),
            "test_per_class": per_class.get("test", test.counts()),
            "skipped": skipped,
            "warnings": warnings,
        },
        "settings": {
            "knn": {
                "ks": list(options.knn_ks),
                "similarity": "cosine (L2-normalised bank and queries)",
                "weighted_temperature": options.knn_temperature,
                "rules": ["weighted", "majority"],
            },
            "linear_probe": {
                "model": "multinomial logistic regression on standardised features",
                "optimizer": "L-BFGS (strong Wolfe), float64, full batch",
                "weight_decays_tried": list(options.probe_weight_decays),
                "selection_split": options.probe_val_fraction,
            },
            "pixel_baseline_size": min(model.image_size, PIXEL_BASELINE_SIZE),
            "seed": options.seed,
            "top5_reported": len(train.class_names) >= 5,
        },
        "encoder_unchanged": True,  # evaluate() raises before writing otherwise
        "results": results,
        "confusion_matrix": {"rows": "true class", "columns": "predicted", "values": confusion},
        "seconds": seconds,
    }


def _write_outputs(
    out_dir: Path, record: dict[str, Any], confusion: list[list[int]], class_names: list[str]
) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Marked like a run folder, so no later scan takes confusion.png for an input image.
        (out_dir / RUN_MARKER).write_text("simclr-cli output folder; not scanned as input\n")
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(out_dir / "eval.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))
        plot_confusion_matrix(confusion, class_names, out_dir / "confusion.png")
    except OSError as error:
        raise ConfigError(
            f"cannot write the evaluation to {out_dir}: {os_error_reason(error)}"
        ) from None


def plot_confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix with counts, true classes down, predictions across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(matrix, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90 if len(class_names) > 10 else 0)
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title("linear probe on the test images")
    if len(class_names) <= 30:
        for row in ticks:
            for column in ticks:
                value = int(counts[row, column])
                if value:
                    colour = "white" if rates[row, column] > 0.5 else "black"
                    axes.text(
                        column, row, str(value), ha="center", va="center", color=colour, fontsize=7
                    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
