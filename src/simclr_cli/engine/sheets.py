"""Contact sheets: rows of image thumbnails with captions, drawn with Pillow.

General enough for any picture made of labelled thumbnails (neighbours of a query, groups
of duplicates, augmented views). Thumbnails are decoded with the same `decode_image` that
training uses, so EXIF rotation and odd colour modes look the same here as to the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from simclr_cli.data.images import decode_image
from simclr_cli.errors import ConfigError, ImageDecodeError, os_error_reason

__all__ = ["Tile", "draw_grid", "fit_thumbnail", "load_thumbnails", "save_png"]

logger = logging.getLogger(__name__)

BACKGROUND = (255, 255, 255)
PLACEHOLDER = (225, 225, 225)
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
ACCENT = (214, 39, 40)
_PAD = 8
_LINE = 15  # caption line height at font size 12


@dataclass(frozen=True)
class Tile:
    """One cell: an image (None draws a grey placeholder), caption lines, optional red frame."""

    image: Image.Image | None
    caption: Sequence[str] = ()
    highlight: bool = False


def fit_thumbnail(image: Image.Image, size: int) -> Image.Image:
    """The image shrunk (never enlarged past 4x) to fit a size x size box, aspect kept."""
    scale = min(size / image.width, size / image.height, 4.0)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _load_one(path: Path, size: int) -> Image.Image | None:
    try:
        return fit_thumbnail(decode_image(path, draft_size=size), size)
    except ImageDecodeError as error:
        logger.warning("no thumbnail for %s: %s", path, error.reason)
        return None


def load_thumbnails(
    paths: Sequence[Path], size: int, *, threads: int = 4
) -> list[Image.Image | None]:
    """Thumbnails of `paths` in order; None (logged) for a file that is gone or unreadable."""
    # Decoding releases the GIL inside Pillow, so threads overlap well for JPEGs.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(lambda path: _load_one(path, size), paths))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, width: int, font: object) -> str:
    """Shorten text in the middle with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:  # type: ignore[arg-type]
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        head, tail = text[: (keep + 1) // 2], text[len(text) - keep // 2 :]
        candidate = f"{head}…{tail}"
        if draw.textlength(candidate, font=font) <= width:  # type: ignore[arg-type]
            return candidate
    return "…"


def draw_grid(
    rows: Sequence[Sequence[Tile]],
    *,
    tile_size: int = 128,
    caption_lines: int = 2,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
) -> Image.Image:
    """Rows of tiles, each a thumbnail centred in its cell with its caption lines below.

    Args:
        rows: Tiles per row; rows may differ in length.
        tile_size: Side of each thumbnail box in pixels.
        caption_lines: Text lines reserved under every tile; more when a tile has more.
        row_titles: A line above each row (a group name), or None.
        title: A line at the top of the sheet, or None.
    """
    font, small = _font(12), _font(11)
    caption_lines = max([caption_lines, *(len(tile.caption) for row in rows for tile in row)])
    columns = max((len(row) for row in rows), default=1)
    cell_w, cell_h = tile_size + _PAD, tile_size + _PAD + caption_lines * _LINE
    row_title_h = _LINE + 4 if row_titles else 0
    title_h = _LINE + 2 * _PAD if title else 0
    width = _PAD + columns * cell_w
    height = title_h + _PAD + len(rows) * (row_title_h + cell_h)
    sheet = Image.new("RGB", (max(width, 200), max(height, 40)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_PAD, _PAD), _fit_text(draw, title, sheet.width - 2 * _PAD, font), TEXT, font)
    y = title_h + _PAD
    for row_number, row in enumerate(rows):
        if row_titles:
            label = _fit_text(draw, row_titles[row_number], width - 2 * _PAD, font)
            draw.text((_PAD, y), label, TEXT, font)
            y += row_title_h
        for column, tile in enumerate(row):
            _draw_tile(draw, sheet, tile, (_PAD + column * cell_w, y), tile_size, small)
        y += cell_h
    return sheet


def _draw_tile(
    draw: ImageDraw.ImageDraw,
    sheet: Image.Image,
    tile: Tile,
    origin: tuple[int, int],
    size: int,
    font: object,
) -> None:
    x, y = origin
    if tile.image is None:
        draw.rectangle((x, y, x + size - 1, y + size - 1), fill=PLACEHOLDER)
    else:
        thumb = tile.image if max(tile.image.size) <= size else fit_thumbnail(tile.image, size)
        sheet.paste(thumb, (x + (size - thumb.width) // 2, y + (size - thumb.height) // 2))
    if tile.highlight:
        draw.rectangle((x - 3, y - 3, x + size + 2, y + size + 2), outline=ACCENT, width=3)
    for line_number, line in enumerate(tile.caption):
        colour = TEXT if line_number == 0 else MUTED
        text = _fit_text(draw, line, size, font)
        draw.text((x, y + size + 3 + line_number * _LINE), text, colour, font)  # type: ignore[arg-type]


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG, creating its folder; a write failure is one clear error."""
    if path.suffix.lower() != ".png":
        raise ConfigError(f"{path}: pictures are written as .png files")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG", optimize=True)
    except OSError as error:
        raise ConfigError(f"cannot write {path}: {os_error_reason(error)}") from None
    return path
