"""Class predictions for a folder of images from a fine-tuned classifier, as a CSV."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from simclr_cli.checkpoint import atomic_write
from simclr_cli.data.augment import center_view
from simclr_cli.data.images import scan_images
from simclr_cli.data.loader import ImageBatches, SkipLog, default_num_workers
from simclr_cli.device import autocast, resolve_device, resolve_precision
from simclr_cli.engine.progress import NullReporter, Reporter
from simclr_cli.errors import ConfigError, DataError, os_error_reason
from simclr_cli.models.backbone import folded_for_inference
from simclr_cli.models.classifier import load_classifier

__all__ = ["PredictOptions", "PredictResult", "predict_folder"]


@dataclass(frozen=True)
class PredictOptions:
    """How `predict_folder` runs."""

    top_k: int = 3
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 256
    num_workers: int | None = None
    strict: bool = False
    max_pixels: int | None = None


@dataclass(frozen=True)
class PredictResult:
    """Where the predictions went and what they cover."""

    csv_path: Path
    predicted: int
    skipped: dict[str, str]
    class_counts: dict[str, int]
    seconds: float


@torch.no_grad()
def predict_folder(
    data_dir: Path,
    model_path: Path | str,
    out_path: Path,
    *,
    options: PredictOptions | None = None,
    reporter: Reporter | None = None,
) -> PredictResult:
    """One CSV row per image file: its class, probability and top-k; unreadable files listed.

    Columns: path, predicted, probability, then class_i/probability_i for i = 1..top_k, and
    error (why a file could not be read; the prediction columns are empty on those rows).
    """
    options = options or PredictOptions()
    reporter = reporter or NullReporter()
    started = time.monotonic()
    if options.top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    classifier = load_classifier(model_path)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    paths = scan_images(data_dir)
    if not paths:
        raise DataError(f"{data_dir}: no images found (looked for common image extensions)")
    preprocessing = classifier.config["preprocessing"]
    skip_log = SkipLog(strict=options.strict)
    data = ImageBatches(
        paths,
        canvas_size=int(preprocessing["decode_size"]),
        num_workers=options.num_workers
        if options.num_workers is not None
        else default_num_workers(),
        skip_log=skip_log,
        max_pixels=options.max_pixels,
    )
    mean = torch.tensor(preprocessing["mean"], device=device)[None, :, None, None]
    std = torch.tensor(preprocessing["std"], device=device)[None, :, None, None]
    # Batch norms folded into the convolutions: same logits, fewer passes (see the function).
    network = (
        nn.Sequential(
            folded_for_inference(classifier.network.backbone), classifier.network.classifier
        )
        .to(device)
        .eval()
    )
    names = classifier.class_names
    top_k = min(options.top_k, len(names))
    rows: dict[int, list[str]] = {}
    reporter.start(task="predict", total=len(paths), unit="image")
    for batch in data.iterate(range(len(paths)), batch_size=options.batch_size):
        images = center_view(
            batch.canvases.to(device), batch.sizes, size=int(classifier.config["image_size"])
        )
        images = ((images - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = network(images)
        probabilities = logits.float().softmax(dim=1).cpu()  # (b, C)
        top_p, top_class = probabilities.topk(top_k, dim=1)
        for index, p_row, c_row in zip(batch.indices.tolist(), top_p, top_class, strict=True):
            row = [names[int(c_row[0])], f"{float(p_row[0]):.6f}"]
            for p, c in zip(p_row.tolist(), c_row.tolist(), strict=True):
                row += [names[c], f"{p:.6f}"]
            rows[index] = row
        reporter.advance(completed=len(rows) + skip_log.count, metrics={})
    reporter.stop()
    if not rows:
        raise DataError(f"none of the {len(paths)} image files in {data_dir} could be read")

    header = ["path", "predicted", "probability"]
    for rank in range(1, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    header.append("error")
    empty = [""] * (len(header) - 2)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for index, path in enumerate(paths):
                if index in rows:
                    writer.writerow([str(path), *rows[index], ""])
                else:
                    reason = skip_log.skipped.get(str(path), "not read")
                    writer.writerow([str(path), *empty, reason])

    try:
        atomic_write(out_path, write)
    except OSError as error:
        raise ConfigError(f"cannot write {out_path}: {os_error_reason(error)}") from None
    counts = {name: 0 for name in names}
    for row in rows.values():
        counts[row[0]] += 1
    return PredictResult(
        out_path, len(rows), dict(skip_log.skipped), counts, time.monotonic() - started
    )
