import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_cli.engine.embeddings import load_embeddings
from simclr_cli.engine.layout import (
    compute_layout,
    draw_map_png,
    spread_sample,
    umap_available,
    write_map_html,
)
from simclr_cli.errors import ConfigError


def test_pca_layout_matches_sklearn_up_to_sign_and_scale(photo_index: Path) -> None:
    # Chunked covariance PCA of the unit rows gives sklearn's first two components.
    from sklearn.decomposition import PCA

    vectors = np.load(photo_index)
    layout = compute_layout(vectors, method="pca")
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    reference = PCA(n_components=2).fit_transform(unit.astype(np.float64))
    for axis in range(2):
        correlation = np.corrcoef(layout.positions[:, axis], reference[:, axis])[0, 1]
        assert abs(correlation) > 0.9999
    assert layout.positions.min() == 0.0 and layout.positions.max() == 1.0
    with pytest.raises(ConfigError, match="unknown layout"):
        compute_layout(vectors, method="tsne")


def test_spread_sample_keeps_one_row_per_cell() -> None:
    # Three points in one corner cell and one elsewhere: two thumbnails, the dense cell first.
    positions = np.array([[0.1, 0.1], [0.12, 0.1], [0.2, 0.2], [0.9, 0.9]])
    assert spread_sample(positions, cells=2, limit=10) == [2, 3]
    assert spread_sample(positions, cells=2, limit=1) == [2]


def test_html_map_is_self_contained_with_every_thumbnail_inline(
    photo_index: Path, tmp_path: Path
) -> None:
    # No network references; each thumbnail is a data URI carrying its file name for hover.
    # This checks the page's structure; test_map_browser.py checks how Chromium draws it.
    embeddings = load_embeddings(photo_index)
    layout = compute_layout(embeddings.vectors, method="pca")
    page, thumbs = write_map_html(layout, embeddings.paths, tmp_path / "map.html")
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<link" not in text and "@import" not in text
    images = re.findall(
        r'<g class="t" data-path="([^"]+)"><title>\1</title>.*?href="([^"]+)"', text
    )
    assert len(images) == thumbs >= 16
    assert all(uri.startswith("data:image/jpeg;base64,") for _, uri in images)
    named = set(re.findall(r'data-path="([^"]+)"', text))
    assert named == {str(p) for p in embeddings.paths}  # every image is on the page
    assert "mouseenter" in text and 'id="name"' in text


def test_png_map_draws_thumbnails(photo_index: Path, tmp_path: Path) -> None:
    # The PNG map exists, is the requested size, and is far from blank.
    embeddings = load_embeddings(photo_index)
    layout = compute_layout(embeddings.vectors, method="pca")
    png, drawn = draw_map_png(layout, embeddings.paths, tmp_path / "map.png", size=800)
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("L"))
    assert image.width == 800 and drawn >= 8
    assert (pixels < 200).mean() > 0.05  # thumbnails cover a good part of the white canvas


@pytest.mark.skipif(not umap_available(), reason="umap-learn not installed")
def test_auto_layout_uses_umap_when_installed_and_keeps_copies_close(photo_index: Path) -> None:
    # With umap-learn, auto picks UMAP; each photo's copies sit nearer to it than most images.
    embeddings = load_embeddings(photo_index)
    layout = compute_layout(embeddings.vectors, method="auto")
    assert layout.method == "umap"
    xy = layout.positions
    distance = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    families = [p.stem.split("__")[0] for p in embeddings.paths]
    same = np.array([[a == b for b in families] for a in families]) & ~np.eye(32, dtype=bool)
    assert np.median(distance[same]) < np.median(distance[~same & ~np.eye(32, dtype=bool)]) / 3


def test_map_thumbnails_never_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 400 rows crowded into clusters: every thumbnail pasted on the map has its own square.
    from simclr_cli.engine import layout as module

    generator = np.random.default_rng(0)
    centres = generator.random((6, 2))
    positions = np.clip(
        centres[generator.integers(0, 6, 400)] + generator.normal(0, 0.05, (400, 2)), 0, 1
    )
    pasted: list[tuple[int, int, int, int]] = []
    real_paste = Image.Image.paste

    def record(self: Image.Image, image: Image.Image, box: tuple[int, int]) -> None:
        pasted.append((box[0], box[1], box[0] + image.width, box[1] + image.height))
        real_paste(self, image, box)

    monkeypatch.setattr(
        module, "load_thumbnails", lambda paths, size: [Image.new("RGB", (size, size))] * len(paths)
    )
    monkeypatch.setattr(Image.Image, "paste", record)
    layout = module.MapLayout(positions=positions, method="pca", description="test")
    paths = [tmp_path / f"{row}.png" for row in range(400)]
    module.draw_map_png(layout, paths, tmp_path / "map.png", size=800, thumb_size=64)
    assert len(pasted) >= 20
    for number, (left, top, right, bottom) in enumerate(pasted):
        for other in pasted[number + 1 :]:
            assert right <= other[0] or other[2] <= left or bottom <= other[1] or other[3] <= top


def test_a_dense_cluster_shows_its_images_around_it(photo_index: Path, tmp_path: Path) -> None:
    # Copies sit on top of their photo in the layout; one thumbnail per cell showed one of
    # each cluster. Neighbouring free cells take the rest: all 32 are drawn here.
    from simclr_cli.engine.layout import draw_map_png, thumbnail_grid

    embeddings = load_embeddings(photo_index)
    layout = compute_layout(embeddings.vectors, method="pca")
    alone = spread_sample(layout.positions, cells=(1600 - 80) // 68, limit=600)
    _, drawn = draw_map_png(layout, embeddings.paths, tmp_path / "map.png")
    assert len(alone) < drawn == 32
    chosen, centres = thumbnail_grid(layout.positions, span=1520, thumb_size=64, limit=600)
    cell = 1520 / (1520 // 68)
    # Each thumbnail within 2.5 cells of its dot (2 cells away, plus half a cell each way).
    assert all(
        np.abs(centres[row] - layout.positions[row] * 1520).max() <= 2.5 * cell for row in chosen
    )
