import re
from pathlib import Path

from typer.testing import CliRunner

from simclr_cli.cli.app import app

runner = CliRunner()


def test_neighbors_prints_k_ranked_files_and_writes_the_sheet(
    photo_index: Path, photos_with_copies: Path, tmp_path: Path
) -> None:
    # One query: a header line, then k lines "rank similarity path", and the PNG.
    query = photos_with_copies / "coffee.png"
    result = runner.invoke(
        app,
        [
            "neighbors",
            str(query),
            "--index",
            str(photo_index),
            "-k",
            "3",
            "-o",
            str(tmp_path / "n.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert "in the index" in lines[0] and len(lines) == 4
    for rank, line in enumerate(lines[1:], start=1):
        match = re.match(r"\s+(\d+)\s+([0-9.]+)\s+(\S+)$", line)
        assert match and int(match[1]) == rank and Path(match[3]).stem.startswith("coffee__")
    assert (tmp_path / "n.png").is_file()


def test_duplicates_and_map_commands_write_their_files(photo_index: Path, tmp_path: Path) -> None:
    # duplicates: CSV + sheet and a summary line; map: PNG + offline HTML.
    result = runner.invoke(
        app,
        ["duplicates", "--index", str(photo_index), "-t", "0.978", "-o", str(tmp_path / "d.csv")],
    )
    assert result.exit_code == 0, result.output
    assert "8 groups holding 32 of 32 images at threshold 0.978" in result.stdout
    assert "largest group" not in result.output
    assert (tmp_path / "d.csv").is_file() and (tmp_path / "d.png").is_file()
    result = runner.invoke(
        app, ["map", "--index", str(photo_index), "-o", str(tmp_path / "m.png"), "--layout", "pca"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.png").is_file() and (tmp_path / "m.html").is_file()


def test_duplicates_warns_when_one_group_swallows_much_of_the_folder(
    photo_index: Path, tmp_path: Path
) -> None:
    # At 0.9 the random encoder links different photos: most of the 32 images in one group.
    out = tmp_path / "d.csv"
    result = runner.invoke(
        app, ["duplicates", "--index", str(photo_index), "-t", "0.9", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "largest group holds" in line]
    assert len(warning) == 1 and "of 32 images at threshold 0.9" in warning[0]


def test_a_mismatched_manifest_is_one_line_and_exit_1(photo_index: Path, tmp_path: Path) -> None:
    # The manifest lists fewer rows than the array holds: one error line, no traceback.
    import shutil

    for suffix in (".npy", ".manifest.csv"):
        shutil.copy(photo_index.with_suffix(suffix), tmp_path / f"v{suffix}")
    manifest = tmp_path / "v.manifest.csv"
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:10]) + "\n")
    result = runner.invoke(app, ["duplicates", "--index", str(tmp_path / "v.npy")])
    assert result.exit_code == 1
    assert "does not match" in result.output and "Traceback" not in result.output
