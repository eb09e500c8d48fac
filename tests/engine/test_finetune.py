import csv
import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from simclr_cli.engine.finetune import FinetuneConfig, finetune, resume_finetune_config
from simclr_cli.engine.predict import PredictOptions, predict_folder
from simclr_cli.engine.progress import NullReporter
from simclr_cli.errors import ConfigError
from simclr_cli.models.classifier import load_classifier
from simclr_cli.models.export import load_model


def config(train: Path, out: Path, model: Path, **changes: object) -> FinetuneConfig:
    base = FinetuneConfig(
        train_dir=str(train),
        out_dir=str(out),
        model=str(model),
        label_fraction=0.5,
        epochs=2,
        batch_size=16,
        optimizer="adamw",
        flip_prob=0.0,
        num_workers=0,
        device="cpu",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


class InterruptAt(NullReporter):
    """Sends the process a real SIGINT once `step` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        if completed == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_finetune_then_predict(
    encoder_dir: Path, digits_folder: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    result = finetune(
        config(digits_folder, tmp_path / "ft", encoder_dir, test_dir=str(digits_test_folder))
    )
    assert result.labelled_images == 100  # half of 20 per class
    assert result.test_images == 100 and result.test_accuracy is not None
    assert result.step == 2 * 7  # ceil(100 / 16) batches per epoch
    classifier = load_classifier(result.run_dir)
    assert classifier.class_names == [str(d) for d in range(10)]
    assert (result.run_dir / "loss.png").is_file()
    # The classifier folder is also an encoder folder for embed/eval.
    assert load_model(result.run_dir).backbone.feature_dim == 512

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for path in sorted(digits_test_folder.rglob("*.png"))[:7]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    out = predict_folder(
        folder, result.run_dir, tmp_path / "p.csv", options=PredictOptions(top_k=3, num_workers=0)
    )
    rows = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert len(rows) == 8 and out.predicted == 7 and len(out.skipped) == 1
    for row in rows:
        if row["path"].endswith("broken.png"):
            assert row["predicted"] == "" and row["error"]
        else:
            probabilities = [float(row[f"probability_{i}"]) for i in (1, 2, 3)]
            assert row["predicted"] == row["class_1"] in classifier.class_names
            assert probabilities == sorted(probabilities, reverse=True)
            assert 0 < sum(probabilities) <= 1 + 1e-6


def test_interrupted_finetune_resumes_to_the_same_weights(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    settings = {"label_fraction": 1.0, "batch_size": 8, "epochs": 2}
    straight = finetune(config(few_digits, tmp_path / "a", encoder_dir, **settings))
    first = finetune(
        config(few_digits, tmp_path / "b", encoder_dir, **settings), reporter=InterruptAt(5)
    )
    assert first.interrupted and first.step == 5
    resumed = finetune(resume_finetune_config(tmp_path / "b"), resume=True)
    assert resumed.step == straight.step and not resumed.interrupted
    a = load_classifier(straight.run_dir).network.state_dict()
    b = load_classifier(resumed.run_dir).network.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(ConfigError, match="cannot change --label-fraction when resuming"):
        resume_finetune_config(tmp_path / "b", label_fraction=0.2)


def test_frozen_encoder_keeps_weights_and_batch_norm_statistics(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    result = finetune(config(few_digits, tmp_path / "frozen", encoder_dir, freeze_encoder=True))
    before = load_model(encoder_dir).backbone.state_dict()
    after = load_classifier(result.run_dir).network.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_from_scratch_uses_the_same_labels_and_other_weights(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    pre = finetune(config(few_digits, tmp_path / "pre", encoder_dir, epochs=1))
    scratch = finetune(
        config(few_digits, tmp_path / "scratch", encoder_dir, epochs=1, from_scratch=True)
    )

    def start(run: Path) -> dict:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return next(r for r in map(json.loads, lines) if r["kind"] == "start")

    assert start(pre.run_dir)["labelled_images"] == start(scratch.run_dir)["labelled_images"]
    pretrained = load_model(encoder_dir).backbone.state_dict()["resnet.conv1.weight"]
    scratch_conv = load_classifier(scratch.run_dir).network.backbone.state_dict()[
        "resnet.conv1.weight"
    ]
    assert not torch.allclose(pretrained, scratch_conv, atol=1e-2)
    record = json.loads((scratch.run_dir / "config.json").read_text())
    assert record["training"]["from_scratch"] is True
