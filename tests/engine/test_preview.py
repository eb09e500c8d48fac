import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli.config import AugmentConfig
from simclr_cli.engine.preview import preview_views, write_preview
from simclr_cli.errors import ImageDecodeError


def test_same_seed_same_views_other_seed_other_views(photo_file: Path) -> None:
    augment = AugmentConfig(image_size=32)
    _, views, params, _, _ = preview_views(photo_file, augment, pairs=4, seed=1)
    _, again, _, _, _ = preview_views(photo_file, augment, pairs=4, seed=1)
    _, other, _, _, _ = preview_views(photo_file, augment, pairs=4, seed=2)
    assert torch.equal(views, again)
    assert not torch.equal(views, other)
    assert views.shape == (8, 3, 32, 32) and len(params) == 4


def test_labels_describe_what_each_tile_shows(photo_file: Path, tmp_path: Path) -> None:
    # With grayscale always on and colour jitter off, every tile is gray and says so; flips
    # are named exactly where the drawn parameters flipped.
    augment = AugmentConfig(image_size=32, grayscale_prob=1.0, jitter_prob=0.0, flip_prob=0.5)
    result = write_preview(photo_file, augment, tmp_path / "v.png", pairs=6, seed=0)
    _, views, params, _, _ = preview_views(photo_file, augment, pairs=6, seed=0)
    assert torch.allclose(views[:, 0], views[:, 1]) and torch.allclose(views[:, 1], views[:, 2])
    for (text_a, text_b), (view_a, view_b) in zip(result.labels, params, strict=True):
        for text, view in ((text_a, view_a), (text_b, view_b)):
            assert "gray" in text and "no jitter" in text
            assert ("flipped" in text) == bool(view.flip[0])
    assert any("flipped" in t for pair in result.labels for t in pair)
    assert result.original_size == (451, 300)
    with Image.open(tmp_path / "v.png") as picture:
        assert picture.width > 6 * 100


@pytest.mark.parametrize(
    ("mode", "size"), [("L", (8, 8)), ("RGB", (1000, 10)), ("RGBA", (40, 30)), ("I;16", (20, 20))]
)
def test_tiny_elongated_and_odd_mode_images_preview(
    tmp_path: Path, mode: str, size: tuple[int, int]
) -> None:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        array = (rng.random(size[::-1]) * 4000).astype(np.uint16)
        image = Image.fromarray(array)
    else:
        shape = size[::-1] if mode == "L" else (*size[::-1], len(mode))
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    path = tmp_path / "odd.png"
    image.save(path)
    result = write_preview(path, AugmentConfig(image_size=32), tmp_path / "v.png", pairs=2)
    assert (tmp_path / "v.png").is_file() and result.original_size == size
    # Each caption's crop lies inside the file, in the file's own pixels, along both axes
    # (the short side of a 1000x10 strip is scaled by another factor than the long side).
    for text in (t for pair in result.labels for t in pair):
        found = re.search(r"crop (\d+)x(\d+) at \((\d+),(\d+)\)", text)
        assert found is not None, text
        w, h, x0, y0 = (int(v) for v in found.groups())
        assert w > 0 and x0 + w <= size[0] + 1 and h > 0 and y0 + h <= size[1] + 1, text


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError):
        write_preview(tmp_path / "nope.jpg", AugmentConfig(image_size=32), tmp_path / "v.png")
