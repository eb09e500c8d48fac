"""A second opinion on "these two images are copies", from their pixels rather than a model.

An encoder can score two different pictures alike: random and briefly trained ones do it for
most pairs, and even a well-trained one can put two photos of similar textures (grass and
gravel in scikit-image's set) at cosine 0.9995. `simclr duplicates` therefore confirms each
link the embedding proposes by looking for one image inside the other:

1. Both images become small grayscale thumbnails (longer side `THUMBNAIL_SIDE`), band-passed
   (a light blur minus a wider one) so that shared smooth gradients, which many unrelated
   photos have, do not count as a match and brightness or contrast changes do not matter.
2. The central 80% of one thumbnail is the template. It is resized over a range of scales
   (a crop of the other image, or a crop of this one, changes the relative scale) and, at
   each scale and also mirrored, slid over the other thumbnail; the score is the highest
   normalised cross-correlation found. Both directions are tried.

Re-encoding, resizing, crops that keep about two thirds or more of each side, mirroring and
colour changes leave the score high; rotations, perspective changes and re-photographing
the same scene do not (turn the check off for those). Scores measured on 19 real photos and
their planted copies are in docs/neighbors.md.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from simclr_cli.data.images import decode_image
from simclr_cli.errors import ImageDecodeError

__all__ = ["DEFAULT_PIXEL_THRESHOLD", "PixelChecker", "Thumbnail", "make_thumbnail", "match_score"]

logger = logging.getLogger(__name__)

THUMBNAIL_SIDE = 96
# Relative scales tried between the template and the other image: 1.05 ** -8 .. 1.05 ** 8,
# about 0.68 .. 1.48. A 5% step keeps the scale error under 2.5%, below what decorrelates a
# band-passed texture at this size.
SCALES = tuple(1.05**step for step in range(-8, 9))
# Copies are most often at scale 1 (re-encoded, resized) or near it (small crops): trying
# those first lets a confirmed pair stop early.
SCALES_BY_DISTANCE = tuple(sorted(SCALES, key=lambda scale: abs(np.log(scale))))
TEMPLATE_FRACTION = 0.8
_FINE_BLUR, _COARSE_BLUR = 0.7, 2.0
# Band-passed thumbnails whose standard deviation is below this (grey levels) have no
# structure to match: blank pages, flat sky. They are compared by their plain thumbnails.
_FLAT_STD = 0.5
_FLAT_MEAN_DIFFERENCE = 8.0
_MIN_TEMPLATE_SIDE = 8

# Measured with benchmarks/duplicates_threshold.py (docs/neighbors.md): planted copies of
# 19 photos score at least 0.80, different photos at most 0.45.
DEFAULT_PIXEL_THRESHOLD = 0.6


@dataclass(frozen=True)
class Thumbnail:
    """What the check keeps of one image: its band-passed thumbnail and a plain 16 x 16 one."""

    detail: np.ndarray  # float32, longer side THUMBNAIL_SIDE, zero mean
    plain: np.ndarray  # float32, 16 x 16 grey levels
    flat: bool


def make_thumbnail(image: Image.Image) -> Thumbnail:
    """The check's view of an image (any mode; converted to grayscale here)."""
    gray = image.convert("L")
    scale = THUMBNAIL_SIDE / max(gray.size)
    size = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
    gray = gray.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    fine = np.asarray(gray.filter(ImageFilter.GaussianBlur(_FINE_BLUR)), dtype=np.float32)
    coarse = np.asarray(gray.filter(ImageFilter.GaussianBlur(_COARSE_BLUR)), dtype=np.float32)
    detail = fine - coarse
    detail -= detail.mean()
    plain = np.asarray(gray.resize((16, 16), Image.Resampling.BOX), dtype=np.float32)
    return Thumbnail(detail=detail, plain=plain, flat=float(detail.std()) < _FLAT_STD)


def _integral(values: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = values.cumsum(0).cumsum(1)
    return table


def _window_sums(table: np.ndarray, height: int, width: int) -> np.ndarray:
    """Sum of every height x width window, from the summed-area table of the values."""
    sums: np.ndarray = (
        table[height:, width:]
        - table[:-height, width:]
        - table[height:, :-width]
        + table[:-height, :-width]
    )
    return sums


def _best_placement(
    image: np.ndarray, template: np.ndarray, *, enough: float | None = None
) -> float | None:
    """Highest normalised cross-correlation of `template` over every position inside `image`.

    Scales are tried from 1 outwards; with `enough`, the search stops at the first score that
    reaches it. None when the template fits at no scale (an image a few pixels thin, say).
    """
    rows, cols = image.shape
    best: float | None = None
    spectrum = np.fft.rfft2(image)
    sums, squares = _integral(image), _integral(image * image)
    for scale in SCALES_BY_DISTANCE:
        height = round(template.shape[0] * scale)
        width = round(template.shape[1] * scale)
        if height > rows or width > cols or min(height, width) < _MIN_TEMPLATE_SIDE:
            continue
        resized = np.asarray(
            Image.fromarray(template, mode="F").resize((width, height), Image.Resampling.BILINEAR),
            dtype=np.float64,
        )
        count = height * width
        sum_1 = _window_sums(sums, height, width)
        sum_2 = _window_sums(squares, height, width)
        # Sum of squared deviations inside each window; windows over flat areas (no structure
        # to match) are left out rather than divided by almost nothing.
        spread = sum_2 - sum_1 * sum_1 / count
        valid = spread > count * _FLAT_STD**2
        if not valid.any():
            continue
        for candidate in (resized, resized[:, ::-1]):
            centred = candidate - candidate.mean()
            norm = float((centred * centred).sum())
            if norm <= count * _FLAT_STD**2:
                continue
            template_spectrum = np.fft.rfft2(centred, s=image.shape)
            product = np.fft.irfft2(spectrum * np.conj(template_spectrum), s=image.shape)
            numerator = product[: rows - height + 1, : cols - width + 1]
            score = float((numerator[valid] / np.sqrt(spread[valid] * norm)).max())
            best = score if best is None else max(best, score)
            if enough is not None and best >= enough:
                return best
    return best


def match_score(first: Thumbnail, second: Thumbnail, *, enough: float | None = None) -> float:
    """How well one image is found inside the other: about 1 for copies, near 0 for strangers.

    With `enough`, the search may stop at the first score that reaches it (enough to decide
    a threshold); the score is then a lower bound of the full search's.
    """
    if first.flat or second.flat:
        return _plain_score(first, second) if first.flat and second.flat else 0.0
    scores = []
    for image, other in ((first.detail, second.detail), (second.detail, first.detail)):
        rows, cols = other.shape
        top = round(rows * (1 - TEMPLATE_FRACTION) / 2)
        left = round(cols * (1 - TEMPLATE_FRACTION) / 2)
        template = np.ascontiguousarray(
            other[top : rows - top, left : cols - left], dtype=np.float32
        )
        score = _best_placement(image.astype(np.float64), template, enough=enough)
        if score is not None:
            scores.append(score)
            if enough is not None and score >= enough:
                break
    # Too thin to search at any scale (a 1000 x 10 strip): only the plain thumbnails remain.
    return max(scores) if scores else _plain_score(first, second)


def _plain_score(first: Thumbnail, second: Thumbnail) -> float:
    """1 when the 16 x 16 thumbnails differ by less than a few grey levels on average, else 0."""
    difference = float(np.abs(first.plain - second.plain).mean())
    return 1.0 if difference < _FLAT_MEAN_DIFFERENCE else 0.0


class PixelChecker:
    """Decides pairs of files by `match_score`; a file that cannot be read leaves a pair unknown.

    Thumbnails are kept for the most recently used `cache_size` files (about 40 KB each), so
    a file in many candidate pairs is decoded once while memory stays bounded on any folder.
    """

    def __init__(
        self,
        paths: list[Path],
        threshold: float = DEFAULT_PIXEL_THRESHOLD,
        *,
        cache_size: int = 4096,
    ) -> None:
        """Check rows of `paths` (the index's files) at `threshold` (DEFAULT_PIXEL_THRESHOLD)."""
        self.paths = paths
        self.threshold = threshold
        self.cache_size = cache_size
        self._thumbnails: OrderedDict[int, Thumbnail] = OrderedDict()
        self.unreadable: set[int] = set()
        self.checked = 0
        self.rejected = 0
        self.unknown = 0

    def _thumbnail(self, row: int) -> Thumbnail | None:
        if row in self.unreadable:
            return None
        cached = self._thumbnails.get(row)
        if cached is not None:
            self._thumbnails.move_to_end(row)
            return cached
        try:
            # No pixel limit of ours: `embed` already accepted this file, perhaps with a
            # raised --max-pixels. Pillow's own bomb check still applies.
            image = decode_image(self.paths[row], max_pixels=None, draft_size=2 * THUMBNAIL_SIDE)
        except ImageDecodeError as error:
            logger.warning(
                "cannot check %s against its near-duplicates by pixels: %s",
                self.paths[row],
                error.reason,
            )
            self.unreadable.add(row)
            return None
        thumbnail = self._thumbnails[row] = make_thumbnail(image)
        if len(self._thumbnails) > self.cache_size:
            self._thumbnails.popitem(last=False)
        return thumbnail

    def confirms(self, first: int, second: int) -> bool | None:
        """True or False from the pixels, None when either file cannot be read any more."""
        a, b = self._thumbnail(first), self._thumbnail(second)
        if a is None or b is None:
            self.unknown += 1
            return None
        self.checked += 1
        confirmed = match_score(a, b, enough=self.threshold) >= self.threshold
        self.rejected += not confirmed
        return confirmed
