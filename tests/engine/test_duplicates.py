import csv
from pathlib import Path

import pytest
from PIL import Image

from conftest import TEST_PHOTOS, family
from simclr_cli.engine import search
from simclr_cli.engine.duplicates import duplicates_sheet, find_duplicates, write_groups_csv
from simclr_cli.engine.embeddings import load_embeddings

# Measured for the tests' random 16 px encoder on these 8 photos (docs/neighbors.md): copies
# score at least 0.9833 with their original, different photos at most 0.9732.
RANDOM_ENCODER_THRESHOLD = 0.978


def families_of(groups, embeddings) -> list[set[str]]:
    return [{family(embeddings.paths[row]) for row in group.rows} for group in groups]


def test_groups_are_exactly_the_photo_families_at_the_measured_threshold(
    photo_index: Path,
) -> None:
    # 8 groups of 4 (photo, JPEG, half size, crop), none mixing two photos.
    embeddings = load_embeddings(photo_index)
    groups = find_duplicates(embeddings, threshold=RANDOM_ENCODER_THRESHOLD, method="exact")
    assert sorted(len(g.rows) for g in groups) == [4] * len(TEST_PHOTOS)
    assert all(len(names) == 1 for names in families_of(groups, embeddings))
    assert all(s >= RANDOM_ENCODER_THRESHOLD for g in groups for s in g.best_similarity)


def test_the_threshold_is_tight_on_both_sides(photo_index: Path) -> None:
    # 0.01 lower merges different photos; 0.01 higher splits some copies from their photo.
    embeddings = load_embeddings(photo_index)
    lower = find_duplicates(embeddings, threshold=RANDOM_ENCODER_THRESHOLD - 0.01)
    assert any(len(names) > 1 for names in families_of(lower, embeddings))
    higher = find_duplicates(embeddings, threshold=RANDOM_ENCODER_THRESHOLD + 0.01)
    assert sum(len(g.rows) for g in higher) < 32


def test_groups_are_written_largest_first_as_csv_and_sheet(
    photo_index: Path, tmp_path: Path
) -> None:
    # CSV: one line per grouped image with its group number and size; the sheet is a PNG.
    embeddings = load_embeddings(photo_index)
    # Slightly below the separating threshold some photos merge, so group sizes differ.
    groups = find_duplicates(embeddings, threshold=RANDOM_ENCODER_THRESHOLD - 0.008)
    assert len({len(g.rows) for g in groups}) > 1
    write_groups_csv(groups, embeddings, tmp_path / "d.csv")
    with (tmp_path / "d.csv").open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == sum(len(g.rows) for g in groups)
    sizes = [int(line["size"]) for line in lines]
    assert sizes == sorted(sizes, reverse=True) and int(lines[0]["group"]) == 1
    sheet = duplicates_sheet(groups, embeddings, max_groups=3)
    assert isinstance(sheet, Image.Image) and sheet.height > min(3, len(groups)) * 128


@pytest.mark.skipif(not search.approx_available(), reason="faiss not installed")
def test_approximate_grouping_agrees_with_exact(photo_index: Path) -> None:
    # Same groups from the HNSW graph's neighbour lists as from all pairs.
    embeddings = load_embeddings(photo_index)
    exact = find_duplicates(embeddings, threshold=RANDOM_ENCODER_THRESHOLD, method="exact")
    approx = find_duplicates(embeddings, threshold=RANDOM_ENCODER_THRESHOLD, method="approx")
    assert [g.rows for g in exact] == [g.rows for g in approx]


def test_progress_is_reported_up_to_every_row(photo_index: Path) -> None:
    # The reporter sees the phase start with N rows and advance to N in chunks.
    class Recorder:
        def __init__(self) -> None:
            self.events: list[tuple[str, int]] = []

        def start(self, *, task: str, total: int, completed: int = 0, unit: str = "step") -> None:
            self.events.append(("start", total))

        def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
            self.events.append(("advance", completed))

        def message(self, text: str) -> None:
            pass

        def stop(self) -> None:
            self.events.append(("stop", 0))

    recorder = Recorder()
    embeddings = load_embeddings(photo_index)
    find_duplicates(embeddings, threshold=0.99, method="exact", reporter=recorder)
    assert recorder.events[0] == ("start", 32) and recorder.events[-1] == ("stop", 0)
    assert recorder.events[-2] == ("advance", 32)


def test_a_large_group_is_drawn_from_across_its_members(
    photo_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 32-image group: the 8 drawn are spread over it (several photos visible), not the
    # first 8 files (astronaut's and brick's only), so a mixed group cannot look clean.
    from simclr_cli.engine import duplicates as module
    from simclr_cli.engine.duplicates import DuplicateGroup

    embeddings = load_embeddings(photo_index)
    drawn: list[Path] = []

    def record(paths: list[Path], size: int) -> list[None]:
        drawn.extend(paths)
        return [None] * len(paths)

    monkeypatch.setattr(module, "load_thumbnails", record)
    rows = sorted(range(embeddings.rows), key=lambda row: embeddings.paths[row].name)
    duplicates_sheet([DuplicateGroup(rows, [0.99] * len(rows))], embeddings, max_per_group=8)
    assert len(drawn) == 8
    assert drawn[0] == embeddings.paths[rows[0]] and drawn[-1] == embeddings.paths[rows[-1]]
    assert len({family(path) for path in drawn}) >= 6
