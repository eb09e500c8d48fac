"""The pixel check behind `simclr duplicates`, on scikit-image's photos and their copies."""

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from conftest import family, photo, write_photos_with_copies
from simclr_cli.engine import duplicates as duplicates_module
from simclr_cli.engine.duplicates import TooManyRejections, find_duplicates
from simclr_cli.engine.embeddings import Embeddings
from simclr_cli.engine.pixel_check import (
    DEFAULT_PIXEL_THRESHOLD,
    PixelChecker,
    make_thumbnail,
    match_score,
)

# Two grey textures that a trained encoder put at cosine 0.9995 (docs/neighbors.md), with
# two other photos so that the groups have something to be kept apart from.
TEXTURES = ("grass", "gravel", "brick", "coffee")


@pytest.fixture(scope="module")
def texture_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_photos_with_copies(tmp_path_factory.mktemp("textures"), TEXTURES)


def model_that_scores_everything_alike(paths: list[Path]) -> Embeddings:
    """An index whose vectors are all the same: every pair is a candidate at any threshold."""
    vectors = np.ones((len(paths), 8), dtype=np.float32) / np.sqrt(8)
    return Embeddings(Path("same.npy"), vectors, paths, meta={})


def test_copies_score_above_the_threshold_and_different_photos_below(
    photos_with_copies: Path,
) -> None:
    # Every pair of the 8 photos x 4 files: the copies of one photo all find each other,
    # no two different photos do.
    files = sorted(photos_with_copies.iterdir())
    thumbnails = {path: make_thumbnail(Image.open(path)) for path in files}
    same, different = [], []
    for a, b in itertools.combinations(files, 2):
        score = match_score(thumbnails[a], thumbnails[b])
        (same if family(a) == family(b) else different).append(score)
    assert len(same) == 8 * 6 and len(different) == 496 - 48
    assert min(same) >= DEFAULT_PIXEL_THRESHOLD + 0.15
    assert max(different) <= DEFAULT_PIXEL_THRESHOLD - 0.1


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


EDITS_KEPT = {
    "corner crop keeping 85%": lambda im: _crop(im, 0, 0, 0.85, 0.85),
    "centre crop keeping 70%": lambda im: _crop(im, 0.15, 0.15, 0.85, 0.85),
    "mirrored": ImageOps.mirror,
    "brighter": lambda im: ImageEnhance.Brightness(im).enhance(1.4),
    "grayscale": lambda im: im.convert("L"),
    "JPEG quality 20": lambda im: _jpeg(im, 20),
    "a quarter of the size": lambda im: im.resize((im.width // 4, im.height // 4)),
}


@pytest.mark.parametrize("edit", list(EDITS_KEPT))
@pytest.mark.parametrize("name", ["chelsea", "grass"])
def test_edits_that_keep_a_copy_a_copy_are_confirmed(name: str, edit: str) -> None:
    image = photo(name)
    score = match_score(make_thumbnail(image), make_thumbnail(EDITS_KEPT[edit](image)))
    assert score >= DEFAULT_PIXEL_THRESHOLD, f"{name}, {edit}: {score:.3f}"


@pytest.mark.parametrize("name", ["chelsea", "grass"])
def test_what_the_check_does_not_match_is_what_the_docs_say(name: str) -> None:
    # A quarter turn, and a crop keeping 60% of each side, are outside what is searched.
    image = photo(name)
    original = make_thumbnail(image)
    for edited in (image.rotate(90, expand=True), _crop(image, 0.2, 0.2, 0.8, 0.8)):
        assert match_score(original, make_thumbnail(edited)) < DEFAULT_PIXEL_THRESHOLD


def test_blank_pages_match_each_other_and_nothing_else() -> None:
    # No structure to correlate: compared by their plain thumbnails instead.
    white = make_thumbnail(Image.new("RGB", (300, 200), (250, 250, 250)))
    also_white = make_thumbnail(Image.new("RGB", (120, 120), (246, 246, 246)))
    black = make_thumbnail(Image.new("RGB", (300, 200), (5, 5, 5)))
    cat = make_thumbnail(photo("chelsea"))
    assert white.flat and also_white.flat and black.flat and not cat.flat
    assert match_score(white, also_white) == 1.0
    assert match_score(white, black) == 0.0 and match_score(white, cat) == 0.0


def test_the_check_turns_a_model_that_links_everything_into_the_right_groups(
    texture_folder: Path,
) -> None:
    # Without the check one group holds all 16 files; with it, each photo and its 3 copies,
    # grass and gravel apart.
    paths = sorted(texture_folder.iterdir())
    embeddings = model_that_scores_everything_alike(paths)
    assert [len(g.rows) for g in find_duplicates(embeddings, method="exact")] == [16]
    checker = PixelChecker(paths)
    groups = find_duplicates(embeddings, method="exact", checker=checker)
    assert sorted(sorted(family(paths[row]) for row in g.rows) for g in groups) == sorted(
        [name] * 4 for name in TEXTURES
    )
    assert checker.rejected > 0 and checker.unknown == 0
    # Each image's best similarity is over its own group (all 1.0 here).
    assert all(value == pytest.approx(1.0) for g in groups for value in g.best_similarity)


def test_a_file_gone_since_embedding_is_left_out_and_joins_nothing(
    texture_folder: Path, tmp_path: Path
) -> None:
    # Run duplicates, delete a copy, run it again: the deleted file must neither be listed
    # nor, as a link everything is "similar" to, join two photos' groups into one.
    paths = sorted(p for p in texture_folder.iterdir() if family(p) in ("brick", "coffee"))
    paths.insert(3, tmp_path / "deleted.png")
    checker = PixelChecker(paths)
    groups = find_duplicates(
        model_that_scores_everything_alike(paths), method="exact", checker=checker
    )
    assert sorted(sorted(family(paths[row]) for row in g.rows) for g in groups) == [
        ["brick"] * 4,
        ["coffee"] * 4,
    ]
    assert checker.unreadable == {3} and checker.unknown > 0


def test_a_model_that_links_too_many_different_pictures_is_stopped(
    texture_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The budget is what keeps a useless model from costing hours of checks on a big folder.
    monkeypatch.setattr(duplicates_module, "REJECTION_BUDGET_BASE", 3)
    monkeypatch.setattr(duplicates_module, "REJECTION_BUDGET_PER_IMAGE", 0)
    paths = sorted(texture_folder.iterdir())
    with pytest.raises(
        TooManyRejections, match=r"^stopped after checking \d+ pairs above threshold 0.97: 4 of"
    ):
        find_duplicates(
            model_that_scores_everything_alike(paths), method="exact", checker=PixelChecker(paths)
        )


def test_thumbnails_are_kept_for_a_bounded_number_of_files(texture_folder: Path) -> None:
    paths = sorted(texture_folder.iterdir())
    checker = PixelChecker(paths, cache_size=3)
    for a, b in itertools.combinations(range(len(paths)), 2):
        checker.confirms(a, b)
    assert len(checker._thumbnails) == 3
    assert checker.checked == len(paths) * (len(paths) - 1) // 2


def test_strips_too_thin_to_search_are_compared_by_their_plain_thumbnails() -> None:
    # A 512 x 5 strip becomes a 96 x 1 thumbnail: no template fits at any scale.
    strip = _crop(photo("astronaut"), 0, 0.4, 1, 0.41)
    assert strip.height <= 6
    again = make_thumbnail(_jpeg(strip, 90))
    assert match_score(make_thumbnail(strip), again) == 1.0
    inverted = make_thumbnail(ImageOps.invert(strip))
    assert match_score(make_thumbnail(strip), inverted) == 0.0
