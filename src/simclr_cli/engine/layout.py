"""A 2-D map of an embedding index, drawn with thumbnails as a PNG and as an offline HTML page.

The layout is PCA of the unit rows by default (computed from a D x D covariance accumulated
chunk by chunk, so any number of rows fits in memory). When umap-learn is installed
(`pip install "simclr-cli[umap]"`, McInnes et al. 2018, https://arxiv.org/abs/1802.03426)
`auto` uses UMAP with cosine distance instead, which keeps local neighbourhoods (copies,
bursts of similar shots) together where PCA's two directions of largest variance blur them.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from simclr_cli.engine.sheets import ACCENT, BACKGROUND, TEXT, load_thumbnails, save_png
from simclr_cli.errors import ConfigError, os_error_reason

__all__ = ["LAYOUTS", "MapLayout", "compute_layout", "draw_map_png", "write_map_html"]

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "pca", "umap")
_CHUNK_ROWS = 65536
_UMAP_MIN_ROWS = 20  # below this UMAP's neighbour graph is too small to mean much
_HTML_MAX_POINTS = 20_000  # hover targets in the page; more makes a sluggish, huge file


@dataclass(frozen=True)
class MapLayout:
    """Positions in [0, 1]^2 of every row (N, 2), and how they were computed."""

    positions: npt.NDArray[np.float64]
    method: str
    description: str


def umap_available() -> bool:
    """Whether umap-learn (the optional non-linear projection) is importable."""
    return importlib.util.find_spec("umap") is not None


def compute_layout(
    vectors: npt.NDArray[np.floating], *, method: str = "auto", seed: int = 0
) -> MapLayout:
    """2-D positions of the rows: `pca`, `umap`, or `auto` (UMAP when installed and N >= 20)."""
    if method not in LAYOUTS:
        raise ConfigError(f"unknown layout {method!r}; use one of {', '.join(LAYOUTS)}")
    if method == "umap" and not umap_available():
        raise ConfigError('the umap layout needs umap-learn: pip install "simclr-cli[umap]"')
    use_umap = method == "umap" or (
        method == "auto" and umap_available() and vectors.shape[0] >= _UMAP_MIN_ROWS
    )
    if use_umap:
        xy, description = _umap_2d(vectors, seed=seed)
        name = "umap"
    else:
        xy, description = _pca_2d(vectors)
        name = "pca"
    return MapLayout(_to_unit_square(xy), name, description)


def _unit_chunks(vectors: npt.NDArray[np.floating]) -> list[tuple[int, npt.NDArray[np.float64]]]:
    chunks = []
    for start in range(0, vectors.shape[0], _CHUNK_ROWS):
        rows = np.asarray(vectors[start : start + _CHUNK_ROWS], dtype=np.float64)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        chunks.append((start, rows / np.maximum(norms, 1e-12)))
    return chunks


def _pca_2d(vectors: npt.NDArray[np.floating]) -> tuple[npt.NDArray[np.float64], str]:
    """Projection of the unit rows on their two principal directions."""
    rows, dim = vectors.shape
    total = np.zeros(dim)
    scatter = np.zeros((dim, dim))
    for _, unit in _unit_chunks(vectors):
        total += unit.sum(axis=0)
        scatter += unit.T @ unit  # (D, D)
    mean = total / rows
    covariance = scatter / rows - np.outer(mean, mean)  # (D, D)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    axes = eigenvectors[:, ::-1][:, :2]  # (D, 2)
    explained = eigenvalues[::-1][:2] / max(float(eigenvalues.sum()), 1e-12)
    xy = np.empty((rows, 2))
    for start, unit in _unit_chunks(vectors):
        xy[start : start + len(unit)] = (unit - mean) @ axes  # (c, 2)
    share = 100 * float(explained.sum())
    return xy, f"PCA of the unit vectors ({share:.0f}% of the variance in these two directions)"


def _umap_2d(
    vectors: npt.NDArray[np.floating], *, seed: int
) -> tuple[npt.NDArray[np.float64], str]:
    import umap

    # Limitation: UMAP needs every row in memory and takes minutes beyond ~100k rows.
    unit = np.concatenate([chunk for _, chunk in _unit_chunks(vectors)]).astype(np.float32)
    neighbours = min(15, unit.shape[0] - 1)
    # A fixed seed makes UMAP single-threaded; a reproducible map is worth the wait.
    reducer = umap.UMAP(
        n_components=2, n_neighbors=neighbours, metric="cosine", random_state=seed, n_jobs=1
    )
    xy = np.asarray(reducer.fit_transform(unit), dtype=np.float64)
    return xy, f"UMAP, cosine distance, {neighbours} neighbours, seed {seed}"


def _to_unit_square(xy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Each axis scaled to [0, 1] on its own, so the map fills the picture."""
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high - low > 1e-12, high - low, 1.0)
    scaled: npt.NDArray[np.float64] = (xy - low) / span
    return scaled


def spread_sample(positions: npt.NDArray[np.float64], *, cells: int, limit: int) -> list[int]:
    """Rows to draw as thumbnails: per grid cell the row nearest its centre, densest cells first.

    Thumbnails of neighbouring rows would hide each other; one per cell keeps them apart and
    still shows every region of the map.
    """
    cell = np.minimum((positions * cells).astype(np.int64), cells - 1)  # (N, 2)
    centre = (cell + 0.5) / cells
    distance = np.linalg.norm(positions - centre, axis=1)
    cell_id = cell[:, 0] * cells + cell[:, 1]
    order = np.lexsort((distance, cell_id))  # by cell, nearest to its centre first
    first = order[np.r_[True, cell_id[order][1:] != cell_id[order][:-1]]]
    counts = np.bincount(cell_id, minlength=cells * cells)[cell_id[first]]
    ranked = first[np.argsort(-counts, kind="stable")]
    return sorted(ranked[:limit].tolist())


def thumbnail_grid(
    positions: npt.NDArray[np.float64], *, span: float, thumb_size: int, limit: int
) -> tuple[list[int], npt.NDArray[np.float64]]:
    """Rows to draw as thumbnails, and where: the centre of a grid cell (0..span) per row.

    Every cell holds at most one thumbnail and is wider than a framed thumbnail, so no two
    overlap. First each occupied cell gets the row nearest its centre (`spread_sample`); then,
    up to `limit`, other rows take the nearest free cell within two cells of their own, so a
    dense cluster shows more of its images around it instead of one. A thumbnail is thus at
    most 2.5 cells from its dot, which stays at the exact position (the PNG draws a line).
    """
    cells = max(1, int(span // (thumb_size + 4)))
    chosen = spread_sample(positions, cells=cells, limit=limit)
    cell = np.minimum((positions * cells).astype(np.int64), cells - 1)  # (N, 2)
    placed = {row: (int(cell[row, 0]), int(cell[row, 1])) for row in chosen}
    taken = set(placed.values())
    if len(placed) < limit and len(placed) < len(positions):
        centre = (cell + 0.5) / cells
        offsets = sorted(
            ((dx, dy) for dx in range(-2, 3) for dy in range(-2, 3) if dx or dy),
            key=lambda offset: offset[0] ** 2 + offset[1] ** 2,
        )
        waiting = np.setdiff1d(np.arange(len(positions)), np.asarray(chosen, dtype=np.int64))
        distance = np.linalg.norm(positions[waiting] - centre[waiting], axis=1)
        # Bounded work on huge maps: rows nearest their cell centres first, 20 per slot left.
        budget = 20 * (limit - len(placed))
        for row in waiting[np.argsort(distance, kind="stable")][:budget].tolist():
            x, y = int(cell[row, 0]), int(cell[row, 1])
            for dx, dy in offsets:
                spot = (x + dx, y + dy)
                if 0 <= spot[0] < cells and 0 <= spot[1] < cells and spot not in taken:
                    placed[row] = spot
                    taken.add(spot)
                    break
            if len(placed) >= limit:
                break
    centres = np.zeros_like(positions)
    for row, (x, y) in placed.items():
        centres[row] = ((x + 0.5) / cells * span, (y + 0.5) / cells * span)
    return sorted(placed), centres


def draw_map_png(
    layout: MapLayout,
    paths: list[Path],
    out: Path,
    *,
    size: int = 1600,
    thumb_size: int = 64,
    max_thumbnails: int = 600,
) -> tuple[Path, int]:
    """Every row as a dot, a spread of rows as thumbnails; returns the path and thumbnails drawn."""
    margin = thumb_size // 2 + 8
    top = 32
    canvas = Image.new("RGB", (size, size + top), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = margin + layout.positions * (size - 2 * margin)  # (N, 2)
    pixels[:, 1] += top
    for x, y in pixels:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(150, 150, 150))
    chosen, centres = thumbnail_grid(
        layout.positions, span=size - 2 * margin, thumb_size=thumb_size, limit=max_thumbnails
    )
    for row in chosen:  # a thin line from each thumbnail to its dot, under the pictures
        x, y = margin + centres[row]
        draw.line((x, y + top, *pixels[row]), fill=(190, 190, 190), width=1)
    unreadable = 0
    for row, thumb in zip(
        chosen, load_thumbnails([paths[r] for r in chosen], thumb_size), strict=True
    ):
        x, y = margin + centres[row]
        y += top
        if thumb is None:
            draw.rectangle((x - 6, y - 6, x + 6, y + 6), outline=ACCENT, width=2)
            unreadable += 1
            continue
        left, upper = int(x - thumb.width / 2), int(y - thumb.height / 2)
        canvas.paste(thumb, (left, upper))
        draw.rectangle(
            (left - 1, upper - 1, left + thumb.width, upper + thumb.height), outline=TEXT
        )
    title = f"{len(paths)} images, {len(chosen)} shown as thumbnails; {layout.description}"
    if unreadable:
        title += f"; red squares: {unreadable} file(s) that could not be read"
    draw.text((8, 8), title, TEXT, font_size=16)
    return save_png(canvas, out), len(chosen)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# No network: styles and the hover script are inline, thumbnails are data URIs.
_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ margin: 0; font: 14px sans-serif; background: #fff; color: #141414; }}
header {{ position: sticky; top: 0; background: #fff; padding: 8px 12px;
  border-bottom: 1px solid #ddd; }}
#name {{ font-family: monospace; color: #d62728; min-height: 1.2em; }}
svg {{ display: block; width: 100%; height: auto; }}
circle {{ fill: #999; }}
.t image {{ transform-box: fill-box; transform-origin: center; }}
.t:hover image {{ transform: scale(3); }}
.t:hover rect, circle:hover {{ stroke: #d62728; stroke-width: 3; }}
</style></head><body>
<header><div>{title}</div><div id="name">hover over an image to see its file</div></header>
"""

_HTML_SCRIPT = """<script>
const nameBox = document.getElementById("name");
for (const item of document.querySelectorAll("[data-path]")) {
  item.addEventListener("mouseenter", () => {
    nameBox.textContent = item.dataset.path;
    item.parentNode.appendChild(item);  // draw the hovered thumbnail on top
  });
}
</script>
"""


def _svg_dot(path: Path, centre: npt.NDArray[np.float64], *, radius: int) -> str:
    name = html.escape(str(path))
    x, y = centre
    return (
        f'<circle data-path="{name}" cx="{x:.1f}" cy="{y:.1f}" r="{radius}">'
        f"<title>{name}</title></circle>"
    )


def _svg_thumbnail(path: Path, centre: npt.NDArray[np.float64], thumb: Image.Image) -> str:
    name = html.escape(str(path))
    w, h = thumb.size
    left, top = centre[0] - w / 2, centre[1] - h / 2
    frame = (
        f'<rect x="{left - 1:.1f}" y="{top - 1:.1f}" width="{w + 2}" height="{h + 2}" '
        'fill="#fff" stroke="#141414"/>'
    )
    picture = (
        f'<image x="{left:.1f}" y="{top:.1f}" width="{w}" height="{h}" href="{_data_uri(thumb)}"/>'
    )
    return f'<g class="t" data-path="{name}"><title>{name}</title>{frame}{picture}</g>'


def write_map_html(
    layout: MapLayout,
    paths: list[Path],
    out: Path,
    *,
    thumb_size: int = 48,
    max_thumbnails: int = 1500,
) -> tuple[Path, int]:
    """The map as one self-contained page: hover a thumbnail or dot to see its file name."""
    size = 1600
    margin = thumb_size // 2 + 4
    pixels = margin + layout.positions * (size - 2 * margin)  # (N, 2)
    rows = np.arange(len(paths))
    if len(rows) > _HTML_MAX_POINTS:
        rows = np.sort(np.random.default_rng(0).choice(len(rows), _HTML_MAX_POINTS, replace=False))
    chosen, centres = thumbnail_grid(
        layout.positions, span=size - 2 * margin, thumb_size=thumb_size, limit=max_thumbnails
    )
    thumbs = dict(zip(chosen, load_thumbnails([paths[r] for r in chosen], thumb_size), strict=True))
    parts = [f'<svg viewBox="0 0 {size} {size}" xmlns="http://www.w3.org/2000/svg">']
    for row in rows.tolist():
        if row not in thumbs:
            parts.append(_svg_dot(paths[row], pixels[row], radius=3))
    for row, thumb in thumbs.items():
        if thumb is None:
            parts.append(_svg_dot(paths[row], pixels[row], radius=6))
        else:
            parts.append(_svg_thumbnail(paths[row], margin + centres[row], thumb))
    parts.append("</svg>")
    shown_points = len(rows)
    title = html.escape(
        f"{len(paths)} images ({shown_points} on the map, {len(thumbs)} as thumbnails); "
        f"{layout.description}"
    )
    page = (
        _HTML_HEAD.format(title=title) + "\n".join(parts) + "\n" + _HTML_SCRIPT + "</body></html>\n"
    )
    if out.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{out}: the interactive map is written as an .html file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot write {out}: {os_error_reason(error)}") from None
    return out, len(thumbs)
