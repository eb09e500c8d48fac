import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli.engine.demo import run_demo


@pytest.mark.slow
def test_demo_pretraining_beats_random_init_by_five_points(tmp_path: Path) -> None:
    # The README's promise: the default demo gains at least 5 kNN points over random init.
    result = run_demo(tmp_path, device="cpu")
    assert result.train_images == 4000 and result.test_images == 1000
    assert result.gain >= 5.0, f"{result.knn_random_init:.3f} -> {result.knn_pretrained:.3f}"


def test_an_interrupted_demo_reports_no_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits_folder: Path
) -> None:
    # Ctrl-C during pretraining: the partly trained encoder is not evaluated or reported.
    import simclr_cli.engine.demo as demo
    from simclr_cli.engine.pretrain import PretrainResult

    evaluated: list[str] = []

    def stopped_pretraining(config, *, reporter, resume):
        return PretrainResult(tmp_path / "run", 40, 1, 6.0, 4000, {}, True, 12.0)

    def knn(model, train_dir, test_dir, *, device, reporter):
        evaluated.append("knn")
        return 0.5

    monkeypatch.setattr(demo, "write_mnist_folders", lambda root: (digits_folder, digits_folder))
    monkeypatch.setattr(demo, "pretrain", stopped_pretraining)
    monkeypatch.setattr(demo, "_knn_accuracy", knn)
    result = run_demo(tmp_path, device="cpu")
    assert result.interrupted and math.isnan(result.knn_pretrained)
    assert evaluated == ["knn"]  # the random-init baseline only


def test_demo_command_after_ctrl_c_exits_130_without_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simclr_cli.engine.demo as demo
    from simclr_cli.cli.app import app

    stopped = demo.DemoResult(
        "MNIST", tmp_path / "run", 4000, 1000, 0.88, math.nan, 30.0, 6.0, interrupted=True
    )
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: stopped)
    outcome = CliRunner().invoke(app, ["demo", "-o", str(tmp_path), "-q"])
    assert outcome.exit_code == 130
    assert "no result to show" in outcome.output and "run the same `simclr demo`" in outcome.output
    assert "gain from pretraining" not in outcome.output and "SimCLR," not in outcome.output
