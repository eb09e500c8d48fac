import json
import shutil
from pathlib import Path

import pytest
import torch

from simclr_cli.data.labeled import scan_labeled
from simclr_cli.device import resolve_precision
from simclr_cli.engine.evaluate import EvalOptions, evaluate
from simclr_cli.engine.features import labeled_features
from simclr_cli.errors import DataError
from simclr_cli.models.export import load_model, state_fingerprint

CPU = torch.device("cpu")


def options(**changes: object) -> EvalOptions:
    base = {"knn_ks": (5, 20), "num_workers": 0, "device": "cpu", "batch_size": 64}
    return EvalOptions(**{**base, **changes})  # type: ignore[arg-type]


def test_eval_writes_every_number_with_baselines_and_a_confusion_matrix(
    encoder_dir: Path, digits_folder: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    result = evaluate(
        encoder_dir,
        digits_folder,
        test_dir=digits_test_folder,
        out_dir=tmp_path / "eval",
        options=options(baselines=("random", "pixels")),
    )
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 1000
    assert set(record["results"]) == {"model", "random", "pixels"}
    assert record["data"]["train_images"] == 200 and record["data"]["test_images"] == 100
    for scores in record["results"].values():
        assert set(scores["knn"]) == {"k5_weighted", "k5_majority", "k20_weighted", "k20_majority"}
        for entry in [*scores["knn"].values(), scores["linear"]]:
            assert 0.0 <= entry["top1"] <= entry["top5"] <= 1.0
        # Real digits are far easier than chance (10%) for every feature source.
        assert scores["linear"]["top1"] > 0.3
    assert record["results"]["pixels"]["features"]["dim"] == 3 * 16 * 16
    confusion = torch.tensor(record["confusion_matrix"]["values"])
    assert int(confusion.sum()) == 100 and confusion.shape == (10, 10)
    assert int(confusion.trace()) == round(100 * result.results["model"]["linear"]["top1"])
    assert record["settings"]["knn"]["weighted_temperature"] == 0.1
    assert record["encoder_unchanged"] is True


def test_second_eval_reads_features_from_the_cache_and_agrees(
    encoder_dir: Path, digits_folder: Path, tmp_path: Path
) -> None:
    first = evaluate(encoder_dir, digits_folder, out_dir=tmp_path / "a", options=options())
    second = evaluate(encoder_dir, digits_folder, out_dir=tmp_path / "b", options=options())
    assert not first.results["model"]["features"]["from_cache"]
    assert second.results["model"]["features"]["from_cache"]
    assert first.results["model"]["knn"] == second.results["model"]["knn"]
    assert first.test_kind == "validation split" and first.test_images == 40


def test_touching_an_image_invalidates_its_cached_features(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "digits"
    shutil.copytree(few_digits, folder)
    model = load_model(encoder_dir)
    precision = resolve_precision("fp32", CPU)
    images = scan_labeled(folder)
    kwargs = {"model": model, "kind": "encoder", "device": CPU, "precision": precision}
    cache = tmp_path / "cache"
    assert not labeled_features(images, cache_dir=cache, num_workers=0, **kwargs).from_cache
    assert labeled_features(images, cache_dir=cache, num_workers=0, **kwargs).from_cache
    first = images.paths[0]
    first.write_bytes(first.read_bytes())  # same content, new modification time
    import os

    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert not labeled_features(images, cache_dir=cache, num_workers=0, **kwargs).from_cache


def test_encoding_leaves_the_encoder_bit_identical(encoder_dir: Path, few_digits: Path) -> None:
    # Weights and batch-norm running statistics, compared tensor by tensor.
    model = load_model(encoder_dir)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    labeled_features(
        scan_labeled(few_digits),
        model=model,
        kind="encoder",
        device=CPU,
        precision=resolve_precision("fp32", CPU),
        num_workers=0,
    )
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # And the fingerprint evaluate() checks does notice a changed statistic.
    fingerprint = state_fingerprint(model.backbone)
    model.backbone.resnet.bn1.running_mean[0] += 1e-6
    assert state_fingerprint(model.backbone) != fingerprint


def test_unknown_baseline_and_unlabelled_folder_are_clear_errors(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    from simclr_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown --baseline imagenet; choose random or pixels"):
        evaluate(
            encoder_dir, few_digits, out_dir=tmp_path, options=options(baselines=("imagenet",))
        )
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(few_digits.rglob("*.png")), flat / "x.png")
    with pytest.raises(DataError, match="subfolder per class"):
        evaluate(encoder_dir, flat, out_dir=tmp_path / "e", options=options())
