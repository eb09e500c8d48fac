import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from simclr_cli.cli.app import app

runner = CliRunner()


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_eval_command_prints_a_table_and_writes_eval_json(
    encoder_dir: Path, digits_folder: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    args = ["eval", str(digits_folder), "--test", str(digits_test_folder), "-m", str(encoder_dir)]
    result = runner.invoke(
        app, [*args, "-k", "10", "--baseline", "pixels", "-o", str(out), "--workers", "0", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert "raw pixels" in result.output and "pretrained" in result.output
    record = json.loads((out / "eval.json").read_text())
    assert set(record["results"]) == {"model", "pixels"}
    assert record["settings"]["knn"]["ks"] == [10]


def test_eval_on_an_unlabelled_folder_is_one_line(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(few_digits.rglob("*.png")), flat / "x.png")
    line = one_line_error(runner.invoke(app, ["eval", str(flat), "-m", str(encoder_dir), "-q"]))
    assert "subfolder per class" in line


def test_finetune_needs_a_model_and_predict_needs_a_classifier(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    line = one_line_error(runner.invoke(app, ["finetune", str(few_digits), "-q"]))
    assert "--model" in line
    line = one_line_error(
        runner.invoke(app, ["predict", str(few_digits), "-m", str(encoder_dir), "-q"])
    )
    assert "simclr finetune" in line


def test_augment_preview_writes_the_png_and_says_where(photo_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "views.png"
    result = runner.invoke(
        app, ["augment-preview", str(photo_file), "-n", "2", "--size", "32", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "") and out.stat().st_size > 1000
    line = one_line_error(runner.invoke(app, ["augment-preview", str(tmp_path / "missing.jpg")]))
    assert "missing.jpg" in line


def test_eval_refuses_a_knn_temperature_that_is_not_positive(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    # exp(similarity / t) with t <= 0 favours the least similar neighbours: wrong numbers.
    for value in ("0", "-0.1"):
        args = ["eval", str(few_digits), "-m", str(encoder_dir), "-o", str(tmp_path / "e")]
        line = one_line_error(runner.invoke(app, [*args, "--knn-temperature", value]))
        assert line == f"error: --knn-temperature must be positive, got {value}"
    assert not (tmp_path / "e").exists()


def test_augment_preview_names_the_option_of_a_bad_probability(
    photo_file: Path, tmp_path: Path
) -> None:
    for option in ("--flip-prob", "--blur-prob"):
        args = ["augment-preview", str(photo_file), option, "2", "-o", str(tmp_path / "v.png")]
        line = one_line_error(runner.invoke(app, args))
        assert line.startswith(f"error: {option} must be a probability in [0, 1], got 2")


def test_eval_table_names_the_k_that_ran_when_k_exceeds_the_training_images(
    encoder_dir: Path, digits_folder: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    # 200 training digits and -k 500: the vote is over all 200, and the table says so.
    args = ["eval", str(digits_folder), "--test", str(digits_test_folder), "-m", str(encoder_dir)]
    result = runner.invoke(app, [*args, "-k", "500", "-o", str(tmp_path), "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    assert "kNN-200 w" in result.output and "kNN-500" not in result.output
    assert "k = 500 capped at the 200 training images" in result.output
