import csv
import re
import shutil
from pathlib import Path

from typer.testing import CliRunner

from conftest import family
from simclr_cli.cli.app import app
from simclr_cli.engine.embed import EmbedOptions, embed_folder

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
    # At 0.9 the random encoder links different photos: by the model alone, most of the 32
    # images in one group.
    out = tmp_path / "d.csv"
    command = ["duplicates", "--index", str(photo_index), "-t", "0.9", "-o", str(out)]
    result = runner.invoke(app, [*command, "--no-pixel-check"])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "largest group holds" in line]
    assert len(warning) == 1 and "of 32 images at threshold 0.9" in warning[0]
    assert "links from the model alone (--no-pixel-check)" in result.stdout


def test_the_pixel_check_undoes_the_false_links_of_a_random_encoder(
    photo_index: Path, tmp_path: Path
) -> None:
    # The same threshold with the check on (the default): each photo with its 3 copies.
    out = tmp_path / "d.csv"
    result = runner.invoke(
        app, ["duplicates", "--index", str(photo_index), "-t", "0.9", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "largest group holds" not in result.output
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(family(row["path"]))
    assert len(rows) == 32 and len(groups) == 8
    assert all(len(families) == 1 for families in groups.values())
    checked = re.search(r"; (\d+) links checked by pixels, (\d+) rejected", result.stdout)
    assert checked and int(checked.group(2)) > 0


def test_a_mismatched_manifest_is_one_line_and_exit_1(photo_index: Path, tmp_path: Path) -> None:
    # The manifest lists fewer rows than the array holds: one error line, no traceback.
    for suffix in (".npy", ".manifest.csv"):
        shutil.copy(photo_index.with_suffix(suffix), tmp_path / f"v{suffix}")
    manifest = tmp_path / "v.manifest.csv"
    manifest.write_text("\n".join(manifest.read_text().splitlines()[:10]) + "\n")
    result = runner.invoke(app, ["duplicates", "--index", str(tmp_path / "v.npy")])
    assert result.exit_code == 1
    assert "does not match" in result.output and "Traceback" not in result.output


def _notes(path: Path) -> Path:
    path.write_text("shopping list: coffee, milk\n")  # a text file under an image name
    return path


def test_unreadable_files_in_a_query_folder_are_skipped_counted_and_named(
    photo_index: Path, photos_with_copies: Path, tmp_path: Path
) -> None:
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("coffee.png", "rocket.png"):
        shutil.copy(photos_with_copies / name, queries / name)
    notes = _notes(queries / "notes.png")
    out = tmp_path / "sheets"
    result = runner.invoke(app, ["neighbors", str(queries), "-i", str(photo_index), "-o", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any(str(notes) in line for line in warnings), result.stderr
    assert any("skipped 1 of 3 query images" in line for line in warnings), result.stderr
    assert "--strict" not in result.output
    headers = [line for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert [Path(line.split(" (")[0]).name for line in headers] == ["coffee.png", "rocket.png"]
    assert sorted(p.name for p in out.iterdir()) == ["coffee.png", "rocket.png"]


def test_an_unreadable_query_named_on_its_own_is_an_error_without_a_missing_option(
    photo_index: Path, photos_with_copies: Path, tmp_path: Path
) -> None:
    # Named explicitly (even beside a folder): the user asked for it, so it is not skipped;
    # the message must not point to --strict, which neighbors does not have.
    notes = _notes(tmp_path / "notes.png")
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(photos_with_copies / "coffee.png", good / "coffee.png")
    result = runner.invoke(app, ["neighbors", str(good), str(notes), "-i", str(photo_index)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {notes}: not an image")
    assert len(result.stderr.splitlines()) == 1 and "--strict" not in result.stderr


def test_an_indexed_file_replaced_after_embedding_is_embedded_afresh(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    import os

    from simclr_cli.engine.embed import EmbedOptions, embed_folder

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee.png", "coffee__jpeg.jpg", "chelsea.png", "chelsea__jpeg.jpg"):
        shutil.copy(photos_with_copies / name, folder / name)
    index = tmp_path / "vecs.npy"
    embed_folder(folder, encoder_dir, index, options=EmbedOptions(num_workers=0))
    written = index.stat().st_mtime
    # coffee.png now holds the cat, saved after the index (times set: filesystems differ in
    # timestamp resolution); chelsea.png is untouched.
    shutil.copy(photos_with_copies / "chelsea__half.png", folder / "coffee.png")
    os.utime(folder / "coffee.png", (written + 5, written + 5))
    os.utime(folder / "chelsea.png", (written - 5, written - 5))

    args = ["-i", str(index), "-k", "1", "-o", str(tmp_path / "n.png")]
    result = runner.invoke(app, ["neighbors", str(folder / "coffee.png"), *args])
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "1 query image modified after the index was written" in warning
    assert "coffee.png" in warning and "simclr embed" in warning
    header, nearest = result.stdout.splitlines()
    assert "(embedded with the index's model)" in header
    assert Path(nearest.split()[-1]).name.startswith("chelsea")  # the new picture's family

    result = runner.invoke(app, ["neighbors", str(folder / "chelsea.png"), *args])
    assert result.exit_code == 0, result.output
    assert "(in the index)" in result.stdout and "warning" not in result.stderr


def _index_of(files: list[Path], folder: Path, encoder_dir: Path) -> Path:
    from simclr_cli.engine.embed import EmbedOptions, embed_folder

    folder.mkdir()
    for file in files:
        shutil.copy(file, folder / file.name)
    index = folder.parent / f"{folder.name}.npy"
    embed_folder(folder, encoder_dir, index, options=EmbedOptions(num_workers=0))
    return index


def test_duplicates_counts_one_group_in_the_singular_and_draws_no_empty_sheet(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    # At 0.978 the random 16 px encoder links each photo with its copies and nothing else
    # (the 8-group test above).
    names = ["coffee.png", "coffee__jpeg.jpg", "rocket.png", "astronaut.png"]
    one = _index_of([photos_with_copies / n for n in names], tmp_path / "one", encoder_dir)
    out = tmp_path / "d.csv"
    result = runner.invoke(app, ["duplicates", "-i", str(one), "-t", "0.978", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("1 group holding 2 of 4 images at threshold 0.978;")
    assert f"drawn in {tmp_path / 'd.png'}; 1 link checked by pixels, 0 rejected" in (
        result.stdout.replace("\n", " ")
    )

    names = ["rocket.png", "astronaut.png", "coffee.png"]
    none = _index_of([photos_with_copies / n for n in names], tmp_path / "none", encoder_dir)
    fresh = tmp_path / "fresh.csv"
    result = runner.invoke(app, ["duplicates", "-i", str(none), "-t", "0.978", "-o", str(fresh)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("no near-duplicates among 3 images at threshold 0.978;")
    assert "no sheet was drawn" in result.stdout and not fresh.with_suffix(".png").exists()
    assert fresh.read_text().splitlines() == ["group,size,row,path,best_similarity"]
    # Into the folder of the run above: its sheet is still there, and the summary says whose.
    result = runner.invoke(app, ["duplicates", "-i", str(none), "-t", "0.978", "-o", str(out)])
    assert f"({tmp_path / 'd.png'} is from an earlier run)" in result.stdout


def test_duplicates_refuses_outputs_it_would_lose_before_any_work(
    photo_index: Path, tmp_path: Path
) -> None:
    # -o x.png: the sheet would overwrite the CSV. -o an existing folder: refused at once.
    result = runner.invoke(
        app, ["duplicates", "-i", str(photo_index), "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1
    assert "give " + str(tmp_path / "x.csv") in result.output and "Traceback" not in result.output
    (tmp_path / "folder").mkdir()
    result = runner.invoke(
        app, ["duplicates", "-i", str(photo_index), "-o", str(tmp_path / "folder")]
    )
    assert result.exit_code == 1
    assert f"{tmp_path / 'folder'} is a folder; -o/--out names a file there" in result.output
    assert "duplicates: row" not in result.output  # no search was started


def test_an_index_without_its_json_is_refused(photo_index: Path, tmp_path: Path) -> None:
    # vecs.json names the embedded folder the manifest's files must lie in; without it an
    # edited manifest could point the commands at any file.
    for suffix in (".npy", ".manifest.csv"):
        shutil.copy(photo_index.with_suffix(suffix), tmp_path / f"v{suffix}")
    for command in (["duplicates"], ["map"]):
        result = runner.invoke(
            app, [*command, "-i", str(tmp_path / "v.npy"), "-o", str(tmp_path / "out.csv")]
        )
        assert result.exit_code == 1
        assert f"{tmp_path / 'v.json'}: not found" in result.output


def test_a_deleted_copy_is_named_left_out_and_merges_nothing(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for file in photos_with_copies.iterdir():
        if family(file) in ("coffee", "rocket"):
            shutil.copy(file, folder / file.name)
    index = tmp_path / "v.npy"
    embed_folder(folder, encoder_dir, index, options=EmbedOptions(num_workers=0))
    (folder / "coffee__jpeg.jpg").unlink()
    out = tmp_path / "d.csv"
    result = runner.invoke(app, ["duplicates", "-i", str(index), "-t", "0.5", "-o", str(out)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "left out of every group" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 1 file could not be read")
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert "coffee__jpeg.jpg" not in {Path(row["path"]).name for row in rows}
    groups: dict[str, set[str]] = {}
    for row in rows:
        groups.setdefault(row["group"], set()).add(family(row["path"]))
    assert sorted(groups.values(), key=sorted) == [{"coffee"}, {"rocket"}]


def test_the_pixel_check_shows_its_counts_while_it_works(photo_index: Path, tmp_path: Path) -> None:
    # Piped output (CliRunner is not a terminal): plain lines with checked/rejected counts.
    result = runner.invoke(
        app, ["duplicates", "-i", str(photo_index), "-t", "0.9", "-o", str(tmp_path / "d.csv")]
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"duplicates: row 32/32 \(100%\) checked \d+ rejected \d+", result.output)


def _index_with_a_deleted_copy(photos: Path, encoder_dir: Path, tmp_path: Path) -> Path:
    """coffee, two of its copies and rocket embedded in tmp_path/photos; then coffee__jpeg.jpg
    deleted."""
    names = ["coffee.png", "coffee__jpeg.jpg", "coffee__half.png", "rocket.png"]
    index = _index_of([photos / n for n in names], tmp_path / "photos", encoder_dir)
    (tmp_path / "photos" / "coffee__jpeg.jpg").unlink()
    return index


def test_neighbors_marks_a_neighbour_whose_file_is_gone(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    index = _index_with_a_deleted_copy(photos_with_copies, encoder_dir, tmp_path)
    query = tmp_path / "photos" / "coffee.png"
    result = runner.invoke(
        app, ["neighbors", str(query), "-i", str(index), "-k", "3", "-o", str(tmp_path / "n.png")]
    )
    assert result.exit_code == 0, result.output
    ranked = [line for line in result.stdout.splitlines() if line.startswith("    ")]
    assert len(ranked) == 3
    assert [line.endswith("coffee__jpeg.jpg  (missing since embed)") for line in ranked].count(
        True
    ) == 1
    assert sum("missing since embed" in line for line in ranked) == 1


def test_without_the_pixel_check_a_deleted_file_is_still_left_out(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    index = _index_with_a_deleted_copy(photos_with_copies, encoder_dir, tmp_path)
    out = tmp_path / "d.csv"
    command = ["duplicates", "-i", str(index), "-t", "0.978", "-o", str(out), "--no-pixel-check"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    assert "1 file listed in the index no longer exists and was left out of every group: " in (
        result.output
    )
    with out.open(newline="") as handle:
        listed = {Path(row["path"]).name for row in csv.DictReader(handle)}
    assert listed == {"coffee.png", "coffee__half.png"}


def test_file_status_says_missing_or_changed_since_embed(
    photos_with_copies: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    import os

    from simclr_cli.engine.embeddings import load_embeddings

    names = ["coffee.png", "coffee__jpeg.jpg", "rocket.png"]
    index = _index_of([photos_with_copies / n for n in names], tmp_path / "photos", encoder_dir)
    embeddings = load_embeddings(index)
    row = {path.name: number for number, path in enumerate(embeddings.paths)}
    (tmp_path / "photos" / "coffee__jpeg.jpg").unlink()
    later = index.stat().st_mtime + 10
    os.utime(tmp_path / "photos" / "rocket.png", (later, later))
    assert embeddings.file_status(row["coffee.png"]) is None
    assert embeddings.file_status(row["coffee__jpeg.jpg"]) == "missing since embed"
    assert embeddings.file_status(row["rocket.png"]) == "changed since embed"
