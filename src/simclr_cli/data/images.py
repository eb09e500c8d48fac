"""Finding image files in a folder tree and decoding them to 8-bit RGB.

`scan_images` lists the training set, `decode_image` turns one file of any common format and
mode into an RGB image with its EXIF orientation applied, and `load_canvas` fits that image
into the fixed square canvas the batch loader stacks.
"""

from __future__ import annotations

import errno
import heapq
import logging
import math
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from simclr_cli.errors import DataError, ImageDecodeError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "RUN_MARKER",
    "decode_image",
    "is_litter",
    "load_canvas",
    "raise_pillow_pixel_limit",
    "scan_images",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)

RUN_MARKER = ".simclr-run"

# Pillow's default `Image.MAX_IMAGE_PIXELS` (written out so that another module changing the
# global cannot move our limit), doubled: the size at which Pillow itself refuses to open.
DEFAULT_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)

# Hidden names (leading dot) are skipped separately; these are the other litter that archive
# tools and file browsers leave in image folders.
_SKIPPED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini"})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})

# Modes whose `transparency` info Pillow can turn into an alpha band.
_KEYED_TRANSPARENCY_MODES = frozenset({"P", "L", "RGB"})

_WHITE = (255, 255, 255, 255)


def scan_images(root: str | Path, *, exclude: Iterable[str | Path] = ()) -> list[Path]:
    """All image files under root, recursively, in a deterministic order.

    Hidden files and folders, `__MACOSX`, `Thumbs.db`, folders holding `RUN_MARKER` (our own
    output) and everything under a path in `exclude` are skipped. Symlinked folders are
    followed once each, so link loops end; a file reached through several links is listed
    once, under the path that sorts first. Unreadable folders are skipped with a warning.

    Args:
        root: Folder to scan.
        exclude: Files or folders to leave out, compared after resolving symlinks.

    Returns:
        Paths joined onto the absolute root (symlinks not resolved), sorted by their path
        relative to root as a POSIX string, so the order is the same on every filesystem.

    Raises:
        DataError: If root is missing, is not a folder, or is one of our output folders.
    """
    # Lexically normalised ("a/../b" becomes "b") so manifests read cleanly; links are kept.
    root_path = Path(os.path.abspath(root))
    _check_root(root_path)
    excluded = {os.path.realpath(path) for path in exclude}

    # Folders are walked in the order of their relative path, so a folder reachable under
    # several names through links is walked once, under the name that sorts first.
    pending: list[tuple[str, str]] = [("", str(root_path))]
    visited: set[str] = set()
    found: list[tuple[str, str, str]] = []  # (sort key, path, resolved path)
    while pending:
        prefix, folder = heapq.heappop(pending)
        real_folder = os.path.realpath(folder)
        if real_folder in visited or real_folder in excluded:
            continue
        visited.add(real_folder)
        listing = _list_folder(folder, real_folder)
        if listing is None:
            continue
        subfolders, files = listing
        for name in subfolders:
            heapq.heappush(pending, (f"{prefix}{_sort_key(name)}/", os.path.join(folder, name)))
        found.extend(
            (prefix + _sort_key(name), os.path.join(folder, name), real) for name, real in files
        )
    return _unique_files(found, excluded)


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"{root}: no such folder; check the path to the image folder")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, but a folder of images is expected")
    if (root / RUN_MARKER).is_file():
        raise DataError(
            f"{root}: this is an output folder of simclr (it holds {RUN_MARKER}); "
            "point at the folder of training images instead"
        )


def _list_folder(folder: str, real_folder: str) -> tuple[list[str], list[tuple[str, str]]] | None:
    """Subfolder names and (image name, resolved path) pairs; None to skip the whole folder."""
    subfolders: list[str] = []
    files: list[tuple[str, str]] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name == RUN_MARKER and entry.is_file():
                    return None
                if is_litter(entry.name):
                    continue
                try:
                    is_dir, is_file = entry.is_dir(), entry.is_file()
                except OSError:  # a link to itself (ELOOP), say: this entry, not the folder
                    is_dir = is_file = False
                if is_dir:
                    subfolders.append(entry.name)
                elif _has_image_extension(entry.name) and (is_file or entry.is_symlink()):
                    # A link that loops or whose target is gone is listed like any image, so
                    # decoding names it, counts it as a skip, and --strict stops on it.
                    # Resolving every file would cost syscalls per path component; only a
                    # link can point outside the folder's own resolved location.
                    real = (
                        os.path.realpath(entry.path)
                        if entry.is_symlink()
                        else os.path.join(real_folder, entry.name)
                    )
                    files.append((entry.name, real))
    except OSError as exc:
        logger.warning("skipping folder %s: %s", folder, exc.strerror or exc)
        return None
    return subfolders, files


def is_litter(name: str) -> bool:
    """Whether a file or folder name is hidden or left by an archiver or file browser."""
    return name.startswith(".") or name.lower() in _SKIPPED_NAMES


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _sort_key(name: str) -> str:
    # macOS filesystems may hand back decomposed (NFD) names; normalising keeps the order
    # identical to Linux for the same names.
    return unicodedata.normalize("NFC", name)


def _unique_files(found: list[tuple[str, str, str]], excluded: set[str]) -> list[Path]:
    seen: set[str] = set()
    unique: list[Path] = []
    for _key, path, real in sorted(found):
        if real in seen or real in excluded:
            continue
        seen.add(real)
        unique.append(Path(path))
    return unique


def decode_image(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Open, apply EXIF orientation, return an 8-bit RGB image; raise ImageDecodeError on failure.

    Transparent pixels are composited over white, CMYK is converted to RGB, and 16/32-bit
    grayscale is stretched from its own min..max to 0..255. Multi-frame files give their first
    frame.

    Args:
        path: Image file.
        max_pixels: Refuse images with more pixels than this (read from the header, before
            decoding); None lifts our limit for this call. Pillow's own refusal (above twice
            `Image.MAX_IMAGE_PIXELS`) still applies: `raise_pillow_pixel_limit` lifts it,
            explicitly and with a log line, for a user who asked for larger images.
        draft_size: If set, a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8) as long
            as its longer side stays at least this many pixels. Much faster for large photos.

    Raises:
        ImageDecodeError: The file is missing, unreadable, not an image, truncated, corrupt or
            larger than `max_pixels`; the reason is one line.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            # Our own `max_pixels` check replaces Pillow's warning, which would otherwise
            # repeat for every large photo in a folder.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow's other warnings ("Corrupt EXIF data") name no file and the image still
            # decodes; they go to the debug log with the file's name instead of to stderr.
            warnings.simplefilter("always", UserWarning)
            with Image.open(path) as img:
                _check_pixels(path, img.size, max_pixels)
                if draft_size is not None:
                    _request_draft(img, draft_size)
                img.load()
                # Read before orientation: the turned copy no longer knows its file format.
                plain_cmyk = img.format == "JPEG" and "adobe" not in img.info
                rgb = _to_rgb(_apply_orientation(img, path), plain_cmyk=plain_cmyk)
                # Closing the file must not invalidate the image we hand back.
                result = rgb if rgb is not img else img.copy()
        for caught_warning in caught:
            logger.debug("%s: %s", path, caught_warning.message)
        return result
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(path, _describe_failure(path, exc, max_pixels)) from exc


def raise_pillow_pixel_limit(max_pixels: int) -> None:
    """Let Pillow open images of up to `max_pixels` (never lowers its limit, never disables it).

    Pillow refuses images above twice `Image.MAX_IMAGE_PIXELS` as decompression bombs. This
    raises that process-wide setting only when the user asked for larger images, and says so.
    """
    needed = math.ceil(max_pixels / 2)
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and needed > current:
        logger.warning(
            "allowing images of up to %d pixels, above Pillow's decompression-bomb limit",
            max_pixels,
        )
        Image.MAX_IMAGE_PIXELS = needed


def _check_pixels(path: str | Path, size: tuple[int, int], max_pixels: int | None) -> None:
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise ImageDecodeError(
            path,
            f"image of {pixels} pixels exceeds the limit of {max_pixels}; "
            "raise it with --max-pixels",
        )


def _request_draft(img: Image.Image, draft_size: int) -> None:
    width, height = img.size
    longer = max(width, height)
    if img.format != "JPEG" or longer <= draft_size:
        return
    # Pillow picks the largest scale that keeps both sides at or above the requested box; a
    # box with the image's own aspect ratio makes the longer side the one that decides.
    box = (
        max(1, math.ceil(width * draft_size / longer)),
        max(1, math.ceil(height * draft_size / longer)),
    )
    img.draft("RGB", box)


def _apply_orientation(img: Image.Image, path: str | Path) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:
        # A damaged EXIF block says nothing reliable about orientation; the pixels are fine.
        logger.debug("ignoring unreadable EXIF in %s: %s", path, exc)
        return img


def _to_rgb(img: Image.Image, *, plain_cmyk: bool = False) -> Image.Image:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _stretch_to_grey(img).convert("RGB")
    if mode == "CMYK" and plain_cmyk:
        # Pillow reads every CMYK JPEG as Adobe-style inverted ink; a JPEG without the Adobe
        # marker stores plain ink (as browsers assume), so undo Pillow's inversion.
        img = ImageChops.invert(img)
    has_keyed_transparency = "transparency" in img.info and mode in _KEYED_TRANSPARENCY_MODES
    palette_has_alpha = mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    if mode in _ALPHA_MODES or has_keyed_transparency or palette_has_alpha:
        # White, not black: transparent regions of logos and scans are meant as paper.
        background = Image.new("RGBA", img.size, _WHITE)
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _stretch_to_grey(img: Image.Image) -> Image.Image:
    """Map the image's own min..max to 0..255; clipping would turn dark 16-bit scans white."""
    # float32 is exact for 16-bit values and far finer than 8-bit output for 32-bit ones.
    values = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", img.size, 0)
    low = float(values[finite].min())
    high = float(values[finite].max())
    # A constant image has no range to stretch; it keeps its value, clipped to 0..255.
    scaled = (values - low) * (255.0 / (high - low)) if high > low else values
    scaled = np.where(finite, scaled, 0.0)
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey)


def _describe_failure(path: str | Path, exc: Exception, max_pixels: int | None = None) -> str:
    detail = " ".join(str(exc).split())[:160]
    if isinstance(exc, Image.DecompressionBombError):
        # Pillow refuses at open, before our own check sees the size. Above our limit too,
        # the reason is ours: the commands lift Pillow's limit along with --max-pixels.
        size = re.search(r"\((\d+) pixels\)", detail)
        if max_pixels is not None and size is not None and int(size.group(1)) > max_pixels:
            return (
                f"image of {size.group(1)} pixels exceeds the limit of {max_pixels}; "
                "raise it with --max-pixels"
            )
        return f"too large for Pillow, which --max-pixels cannot lift ({detail})"
    if isinstance(exc, UnidentifiedImageError):
        return "empty file" if _is_empty(path) else "not an image, or a format Pillow cannot read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "a link to nothing (its target is gone)" if os.path.islink(path) else "no such file"
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return "a symbolic link that loops (following it leads back to a link already followed)"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(exc, (OSError, SyntaxError, EOFError)):
        return f"truncated or corrupt image ({detail})" if detail else "truncated or corrupt image"
    return f"cannot decode ({type(exc).__name__}: {detail})"


def _is_empty(path: str | Path) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return False


def load_canvas(
    path: str | Path, size: int, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[npt.NDArray[np.uint8], tuple[int, int]]:
    """Decode an image and fit it, aspect kept, into the top-left of a zeroed square canvas.

    Args:
        path: Image file.
        size: Canvas side; the image's longer side is resized to exactly this.
        max_pixels: As for `decode_image`.

    Returns:
        The (3, size, size) uint8 canvas and the (height, width) of its valid region, each
        at least 1.

    Raises:
        ValueError: If size is below 1.
        ImageDecodeError: As for `decode_image`.
    """
    if size < 1:
        raise ValueError(f"canvas size must be at least 1, got {size}")
    img = decode_image(path, max_pixels=max_pixels, draft_size=size)

    width, height = img.size
    longer = max(width, height)
    if width >= height:
        new_size = (size, max(1, min(size, round(height * size / longer))))
    else:
        new_size = (max(1, min(size, round(width * size / longer))), size)
    new_width, new_height = new_size
    canvas = np.zeros((3, size, size), dtype=np.uint8)
    canvas[:, :new_height, :new_width] = _resized_chw(img, new_size)
    return canvas, (new_height, new_width)


# Pillow's `reducing_gap`: a side shrunk by twice this factor or more is first averaged in
# whole blocks of pixels (`Image.reduce`), then resampled, so a 4000 px PNG, which has no
# reduced-scale decoding, stays cheap. The result is no longer the exact filter: several
# levels off on photos, up to 20 on sharp-edged content.
_BLOCK_REDUCE_GAP = 3.0


def _resized_chw(img: Image.Image, new_size: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """`img` (8-bit RGB) resized to `new_size` (width, height) as a (3, height, width) array.

    Shrinking is antialiased bilinear, enlarging bicubic, as Pillow's `resize` does them.
    On x86 CPUs with AVX2, torch's vectorised uint8 resampling does the work when the
    result is at least `_TORCH_RESIZE_MIN_SIDE` on its longer side and each side shrinks
    less than 6x (where Pillow computes the exact filter too); the two land within 2 levels.
    Measured on a 2-core Zen 4 EPYC (benchmarks/decode_speed.py): photo crops (shorter side
    128-320 px) took 0.62 ms per image, decoding included, into the 192 px canvas of 96 px
    training against 0.93 with Pillow resizing, and 0.97 against 2.62 into the 448 px canvas
    of 224 px training. Below about 96 px torch's fixed cost per call (some 40 us) outweighs
    its speed: 32 px digits into a 64 px canvas took 0.17 ms against Pillow's 0.14. Larger
    shrinks (big PNGs; big JPEGs are decoded at a reduced scale first) stay with Pillow's
    block-averaging shortcut, which is faster there than handing torch every pixel.
    Elsewhere (ARM, including Apple silicon) torch has only a generic kernel, which took
    1.7-1.9x Pillow's time when forced on the same EPYC, so Pillow keeps the job there (not
    measured on such CPUs).
    """
    width, height = img.size
    new_width, new_height = new_size
    if (width, height) == new_size:
        return np.asarray(img).transpose(2, 0, 1)
    shrinking = max(width, height) > max(new_size)
    # Per side, as Pillow decides on its shortcut: a 13 x 500 strip fitted to 2 x 96 shrinks
    # its width 6.5x, and there Pillow's result is the shortcut's, not the exact filter.
    by_torch = (
        _VECTORISED_UINT8_RESIZE
        and max(new_size) >= _TORCH_RESIZE_MIN_SIDE
        and width < 2 * _BLOCK_REDUCE_GAP * new_width
        and height < 2 * _BLOCK_REDUCE_GAP * new_height
    )
    if not by_torch:
        if shrinking:
            img = img.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=_BLOCK_REDUCE_GAP)
        else:
            img = img.resize(new_size, Image.Resampling.BICUBIC)
        return np.asarray(img).transpose(2, 0, 1)
    with warnings.catch_warnings():
        # Pillow's pixels are read-only; torch warns about that, but only reads them here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(np.asarray(img))
    # (1, 3, H, W) viewing the (H, W, 3) pixels: the channels-last layout for which torch
    # has vectorised uint8 kernels.
    resized = torch.nn.functional.interpolate(
        pixels.permute(2, 0, 1).unsqueeze(0),
        size=(new_height, new_width),
        mode="bilinear" if shrinking else "bicubic",
        antialias=True,
        align_corners=False,
    )
    return resized[0].numpy()


# torch's uint8 resize kernels are written for AVX2 (and run under its AVX512 dispatch too).
_VECTORISED_UINT8_RESIZE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# Results smaller than this on their longer side are left to Pillow (see `_resized_chw`);
# on the EPYC the two were even between 64 and 96 px, for photos and for digits alike.
_TORCH_RESIZE_MIN_SIDE = 96
