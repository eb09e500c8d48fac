import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageOps
from skimage import data as skdata

from simclr_cli.data import images
from simclr_cli.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    RUN_MARKER,
    decode_image,
    load_canvas,
    scan_images,
)
from simclr_cli.errors import DataError, ImageDecodeError

# ---------------------------------------------------------------- helpers and photos


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    """Chelsea the cat (skimage), shrunk to 90x60 so each test stays fast."""
    return Image.fromarray(skdata.chelsea()).resize((90, 60), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((64, 64), Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    """The grayscale cameraman (skimage), 128x128 uint8."""
    return np.asarray(Image.fromarray(skdata.camera()).resize((128, 128)))


def _save(img: Image.Image, path: Path, **options: object) -> Path:
    img.save(path, **options)
    return path


def _assert_rgb(result: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert result.mode == "RGB"
    assert result.size == size
    pixels = np.asarray(result)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (size[1], size[0], 3)
    return pixels


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _stretched(values: np.ndarray) -> np.ndarray:
    """Reference for the grayscale rule: min..max mapped linearly onto 0..255."""
    values = values.astype(np.float64)
    low, high = values.min(), values.max()
    return np.rint((values - low) * 255.0 / (high - low)).astype(np.uint8)


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A minimal PNG; Pillow cannot write 16-bit colour PNGs, so tests assemble them."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(raw)) if raw else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def _png16(pixels: np.ndarray) -> bytes:
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return _png(width, height, 16, {3: 2, 4: 6}[channels], rows)


def _strip_adobe_marker(jpeg: bytes) -> bytes:
    start = jpeg.index(b"\xff\xee")  # APP14 "Adobe"
    length = struct.unpack(">H", jpeg[start + 2 : start + 4])[0]
    return jpeg[:start] + jpeg[start + 2 + length :]


# ---------------------------------------------------------------- decode_image: modes


def test_one_bit_image_decodes_to_black_and_white_rgb(tmp_path, cat):
    # Rule: mode "1" becomes RGB with only 0 and 255.
    path = _save(cat.convert("1"), tmp_path / "cat.png")
    pixels = _assert_rgb(decode_image(path), cat.size)
    assert set(np.unique(pixels)) <= {0, 255}
    assert len(np.unique(pixels)) == 2


def test_grayscale_image_decodes_to_equal_channels(tmp_path, camera):
    # Rule: mode "L" becomes RGB with three identical channels equal to the grey values.
    path = _save(Image.fromarray(camera), tmp_path / "camera.png")
    pixels = _assert_rgb(decode_image(path), (128, 128))
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], camera)


def test_palette_image_decodes_to_its_palette_colours(tmp_path, cat):
    # Rule: mode "P" without transparency becomes RGB through its palette.
    palette_img = cat.quantize(colors=64)
    path = _save(palette_img, tmp_path / "cat.png")
    assert Image.open(path).mode == "P"
    pixels = _assert_rgb(decode_image(path), cat.size)
    np.testing.assert_array_equal(pixels, np.asarray(palette_img.convert("RGB")))
    assert _mean_abs_diff(pixels, np.asarray(cat)) < 8


def test_palette_transparency_is_composited_over_white(tmp_path, cat):
    # Rule: a "P" image with a transparent index shows white there, not the palette colour.
    palette_img = cat.quantize(colors=255)
    palette = palette_img.getpalette() or []
    palette_img.putpalette(palette[: 255 * 3] + [0, 0, 0])  # index 255: black...
    palette_img.paste(255, (0, 0, 20, 10))  # ...painted in the top-left corner
    path = _save(palette_img, tmp_path / "cat.png", transparency=255)
    pixels = _assert_rgb(decode_image(path), cat.size)
    assert (pixels[:10, :20] == 255).all()
    assert _mean_abs_diff(pixels[20:, 30:], np.asarray(cat)[20:, 30:]) < 8


def test_gif_with_transparent_index_is_composited_over_white(tmp_path, cat):
    # Rule: GIF transparency is honoured like PNG palette transparency.
    palette_img = cat.quantize(colors=255)
    palette_img.paste(255, (70, 40, 90, 60))
    path = _save(palette_img, tmp_path / "cat.gif", transparency=255)
    pixels = _assert_rgb(decode_image(path), cat.size)
    assert (pixels[40:, 70:] == 255).all()


def test_grey_with_alpha_is_composited_over_white(tmp_path, camera):
    # Rule: mode "LA" becomes RGB; fully transparent pixels turn white, opaque ones keep grey.
    alpha = np.full_like(camera, 255)
    alpha[:16, :16] = 0
    path = _save(Image.fromarray(np.dstack([camera, alpha]), mode="LA"), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    pixels = _assert_rgb(decode_image(path), (128, 128))
    assert (pixels[:16, :16] == 255).all()
    np.testing.assert_array_equal(pixels[16:, :, 0], camera[16:])


def test_rgba_transparent_pixels_become_white_and_half_alpha_blends(tmp_path, astronaut):
    # Rule: RGBA is alpha-composited over white: alpha 0 -> white, alpha 255 -> unchanged.
    rgb = np.asarray(astronaut)
    alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
    alpha[:8, :8] = 0
    alpha[-8:, -8:] = 128
    path = _save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "astronaut.png")
    pixels = _assert_rgb(decode_image(path), (64, 64))
    assert (pixels[:8, :8] == 255).all()
    np.testing.assert_array_equal(pixels[8:56, 8:56], rgb[8:56, 8:56])
    half = rgb[-8:, -8:].astype(np.float64) * 128 / 255 + 255 * 127 / 255
    assert np.abs(pixels[-8:, -8:] - half).max() <= 1


def test_red_cmyk_jpeg_decodes_to_red_not_cyan(tmp_path):
    # Rule: CMYK JPEGs (Adobe-inverted, as Pillow and Photoshop write them) keep their colours.
    path = _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), tmp_path / "red.jpg", quality=95)
    pixels = _assert_rgb(decode_image(path), (32, 32)).astype(int)
    red, green, blue = pixels[..., 0].mean(), pixels[..., 1].mean(), pixels[..., 2].mean()
    assert red > 230 and green < 25 and blue < 25


def test_cmyk_jpeg_without_adobe_marker_is_read_as_plain_ink(tmp_path):
    # Rule: without the Adobe marker CMYK is stored uninverted, so red must still come out red.
    ink = ImageChops.invert(Image.new("CMYK", (32, 32), (0, 255, 255, 0)))
    buffer = io.BytesIO()
    ink.save(buffer, "JPEG", quality=95)  # Pillow inverts on write: the file holds plain ink
    path = tmp_path / "red.jpg"
    path.write_bytes(_strip_adobe_marker(buffer.getvalue()))
    assert "adobe" not in Image.open(path).info
    pixels = _assert_rgb(decode_image(path), (32, 32)).astype(int)
    assert pixels[..., 0].mean() > 230 and pixels[..., 1:].mean() < 25


def test_cmyk_photo_keeps_its_colours_in_jpeg_and_tiff(tmp_path, cat):
    # Rule: a photo converted to CMYK decodes back close to the original in both formats.
    cmyk = cat.convert("CMYK")
    for name, options in (("cat.jpg", {"quality": 95}), ("cat.tif", {})):
        path = _save(cmyk, tmp_path / name, **options)
        assert Image.open(path).mode == "CMYK"
        pixels = _assert_rgb(decode_image(path), cat.size)
        assert _mean_abs_diff(pixels, np.asarray(cat)) < 6, name


@pytest.mark.parametrize(
    ("name", "dtype", "scale", "offset"),
    [
        ("i16.png", np.uint16, 257.0, 0.0),  # full 16-bit range
        ("dark16.png", np.uint16, 4000 / 255, 0.0),  # 0..4000: clipping would give near-white
        ("i16be.tif", ">u2", 100.0, 500.0),
        ("i32.tif", np.int32, 1000.0, -70000.0),  # negative values
        ("f32.tif", np.float32, 1 / 255, 0.0),  # 0..1 floats: clipping would give near-black
    ],
)
def test_high_bit_depth_grey_is_stretched_by_its_own_range(
    tmp_path, camera, name, dtype, scale, offset
):
    # Rule: 16/32-bit grey is rescaled from its min..max to 0..255, never clipped.
    values = (camera.astype(np.float64) * scale + offset).astype(dtype)
    path = _save(Image.fromarray(values), tmp_path / name)
    assert Image.open(path).mode in {"I;16", "I;16B", "I", "F"}
    pixels = _assert_rgb(decode_image(path), (128, 128))
    expected = _stretched(values)
    assert np.abs(pixels[..., 0].astype(int) - expected).max() <= 1
    assert pixels.min() == 0 and pixels.max() == 255


def test_constant_16_bit_image_keeps_its_clipped_value(tmp_path):
    # Rule: a flat 16-bit image has no range to stretch; values 0..255 stay, larger ones clip.
    for value, expected in ((0, 0), (100, 100), (40000, 255)):
        path = _save(Image.fromarray(np.full((8, 8), value, np.uint16)), tmp_path / f"{value}.png")
        pixels = _assert_rgb(decode_image(path), (8, 8))
        assert (pixels == expected).all()


def test_16_bit_rgb_png_decodes_to_8_bit_rgb(tmp_path):
    # Rule: 16-bit-per-channel colour PNGs come out as 8-bit RGB with the right colours.
    pixels16 = np.zeros((6, 10, 3), np.uint16)
    pixels16[..., 0] = 65535
    pixels16[:, 5:, 2] = 32768
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png16(pixels16))
    pixels = _assert_rgb(decode_image(path), (10, 6)).astype(int)
    assert (pixels[..., 0] == 255).all() and (pixels[..., 1] == 0).all()
    assert (np.abs(pixels[:, 5:, 2] - 128) <= 1).all() and (pixels[:, :5, 2] == 0).all()


def test_16_bit_rgba_png_is_composited_over_white(tmp_path):
    # Rule: 16-bit alpha is honoured like 8-bit alpha.
    pixels16 = np.zeros((4, 4, 4), np.uint16)
    pixels16[..., 0] = 65535
    pixels16[:, :2, 3] = 65535
    path = tmp_path / "rgba16.png"
    path.write_bytes(_png16(pixels16))
    pixels = _assert_rgb(decode_image(path), (4, 4))
    assert (pixels[:, :2] == (255, 0, 0)).all() and (pixels[:, 2:] == 255).all()


@pytest.mark.parametrize("extension", sorted(IMAGE_EXTENSIONS))
def test_every_listed_extension_decodes(tmp_path, astronaut, extension):
    # Rule: each extension scan_images accepts is one decode_image can read.
    source = astronaut.convert("1") if extension == ".pbm" else astronaut
    if extension == ".pgm":
        source = astronaut.convert("L")
    path = _save(source, tmp_path / f"astronaut{extension}")
    pixels = _assert_rgb(decode_image(path), (64, 64))
    assert pixels.std() > 20  # a real picture, not a blank


def test_multi_frame_gif_and_tiff_give_the_first_frame(tmp_path, cat, astronaut):
    # Rule: animations and multi-page files decode to their first frame.
    first, second = cat.resize((64, 64)), astronaut
    for name in ("anim.gif", "pages.tif"):
        path = _save(first, tmp_path / name, save_all=True, append_images=[second])
        assert getattr(Image.open(path), "n_frames", 1) == 2
        pixels = _assert_rgb(decode_image(path), (64, 64))
        assert _mean_abs_diff(pixels, np.asarray(first)) < 8, name
        assert _mean_abs_diff(pixels, np.asarray(second)) > 30, name


# ---------------------------------------------------------------- decode_image: EXIF

# Where the marked top-left corner of the stored pixels must appear once orientation is applied
# (EXIF 2.32, tag 0x0112): row 0 = top, col 0 = left.
_MARKER_CORNER = {
    1: ("top", "left"),
    2: ("top", "right"),
    3: ("bottom", "right"),
    4: ("bottom", "left"),
    5: ("top", "left"),
    6: ("top", "right"),
    7: ("bottom", "right"),
    8: ("bottom", "left"),
}

_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, k=1),
}


def _block_means(pixels: np.ndarray, block: int = 8) -> np.ndarray:
    height, width = pixels.shape[0] // block, pixels.shape[1] // block
    cropped = pixels[: height * block, : width * block].astype(np.float64)
    return cropped.reshape(height, block, width, block, 3).mean(axis=(1, 3))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, cat, orientation):
    # Rule: the decoded image is the stored one turned as EXIF orientation 1..8 says.
    stored = np.asarray(cat.resize((64, 40))).copy()
    stored[:16, :16] = (0, 0, 255)  # a blue marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(
        Image.fromarray(stored),
        tmp_path / "cat.jpg",
        exif=exif.tobytes(),
        quality=95,
        subsampling=0,
    )

    pixels = _assert_rgb(decode_image(path), (40, 64) if orientation >= 5 else (64, 40))

    expected = np.ascontiguousarray(_ORIENT[orientation](stored))
    assert np.abs(_block_means(pixels) - _block_means(expected)).max() < 12
    vertical, horizontal = _MARKER_CORNER[orientation]
    rows = slice(0, 16) if vertical == "top" else slice(-16, None)
    cols = slice(0, 16) if horizontal == "left" else slice(-16, None)
    corner = pixels[rows, cols].reshape(-1, 3).mean(axis=0)
    assert corner[2] > 200 and corner[0] < 50 and corner[1] < 50


def test_malformed_exif_still_decodes(tmp_path, cat):
    # Rule: a damaged EXIF block never costs a good image; it decodes unturned.
    garbage_exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00\xff\xff\xff\x7f"
    path = _save(cat, tmp_path / "cat.jpg", exif=garbage_exif, quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow says "Corrupt EXIF data"; that is expected
        pixels = _assert_rgb(decode_image(path), cat.size)
    assert _mean_abs_diff(pixels, np.asarray(cat)) < 6


def test_failing_exif_transpose_falls_back_to_unturned_image(tmp_path, cat, monkeypatch):
    # Rule: if applying the orientation raises, decoding returns the image as stored.
    def broken_transpose(image: Image.Image) -> Image.Image:
        raise SyntaxError("bad IFD")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken_transpose)
    path = _save(cat, tmp_path / "cat.png")
    pixels = _assert_rgb(decode_image(path), cat.size)
    np.testing.assert_array_equal(pixels, np.asarray(cat))


# ---------------------------------------------------------------- decode_image: failures


def _decode_error(path: Path, **options: object) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(path, **options)
    error = caught.value
    assert "\n" not in str(error) and "\n" not in error.reason
    assert Path(error.path) == path and str(error).startswith(str(path))
    return error


@pytest.mark.parametrize("extension", [".jpg", ".png"])
def test_truncated_file_raises_decode_error(tmp_path, astronaut, extension):
    # Rule: a file cut in half fails at decode time with a one-line "truncated" reason.
    buffer = io.BytesIO()
    astronaut.save(buffer, "JPEG" if extension == ".jpg" else "PNG")
    path = tmp_path / f"half{extension}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert "truncated or corrupt" in _decode_error(path).reason


def test_zero_byte_file_raises_decode_error(tmp_path):
    # Rule: an empty file is reported as empty.
    path = tmp_path / "empty.png"
    path.touch()
    assert _decode_error(path).reason == "empty file"


def test_text_file_named_jpg_raises_decode_error(tmp_path):
    # Rule: a file that is not an image, whatever its name, is reported as such.
    path = tmp_path / "notes.jpg"
    path.write_text("these are my holiday notes\nnot a picture\n")
    assert "not an image" in _decode_error(path).reason


def test_missing_file_and_folder_raise_decode_error(tmp_path):
    # Rule: missing files and folders passed as images fail with a plain reason.
    assert _decode_error(tmp_path / "gone.jpg").reason == "no such file"
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert "folder" in _decode_error(folder).reason


def test_unreadable_file_raises_permission_denied(tmp_path, astronaut, monkeypatch):
    # Rule: a file we may not read is reported as "permission denied" (faked: tests run as root).
    path = _save(astronaut, tmp_path / "secret.png")

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    assert _decode_error(path).reason == "permission denied"


def test_image_over_max_pixels_is_refused_unless_limit_lifted(tmp_path, astronaut):
    # Rule: the header size is checked against max_pixels before decoding; None lifts it.
    limit_before = Image.MAX_IMAGE_PIXELS
    path = _save(astronaut.resize((20, 20)), tmp_path / "small.png")

    error = _decode_error(path, max_pixels=100)
    assert "400 pixels" in error.reason and "limit of 100" in error.reason
    assert "--max-pixels" in error.reason
    _assert_rgb(decode_image(path, max_pixels=400), (20, 20))  # the limit itself is allowed
    _assert_rgb(decode_image(path, max_pixels=None), (20, 20))
    assert limit_before == Image.MAX_IMAGE_PIXELS  # the global was never touched
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485


def test_huge_header_is_refused_before_any_pixel_is_decoded(tmp_path):
    # Rule: a tiny file claiming 400 megapixels fails fast, with our limit named in the reason.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(20_000, 20_000, 8, 2, b""))
    assert "limit of 178956970" in _decode_error(path).reason
    # Past our lifted limit, Pillow's own bomb check still refuses; we say it cannot be lifted.
    assert "too large for Pillow" in _decode_error(path, max_pixels=None).reason


def test_large_but_allowed_header_emits_no_bomb_warning(tmp_path):
    # Rule: Pillow's DecompressionBombWarning is silenced; our max_pixels is the only limit.
    path = tmp_path / "big.png"
    path.write_bytes(_png(10_000, 10_000, 8, 2, b""))  # 100 MP: over Pillow's warning level
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "truncated or corrupt" in _decode_error(path).reason  # header only, no pixels
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ---------------------------------------------------------------- scan_images


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.coffee()).resize((8, 8)).save(buffer, "PNG")
    return buffer.getvalue()


def _tree(root: Path, files: list[str], content: bytes) -> Path:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def _relative(paths: list[Path], root: Path) -> list[str]:
    return [path.relative_to(root).as_posix() for path in paths]


def test_nested_images_with_any_case_extension_are_listed_once_in_order(tmp_path, png_bytes):
    # Rule: recursive, case-insensitive extensions, each file once, sorted by relative path.
    names = ["b.Png", "a.JPG", "c.jpeg", "sub/deeper/d.BMP", "sub/e.webp", "z/f.TIFF"]
    root = _tree(tmp_path / "data", names, png_bytes)
    found = scan_images(root)
    assert _relative(found, root) == sorted(names)
    assert all(path.is_absolute() for path in found)


def test_hidden_files_litter_and_non_images_are_skipped(tmp_path, png_bytes):
    # Rule: dotfiles, dot-folders, __MACOSX, Thumbs.db, .DS_Store and non-images are not listed.
    skipped = [
        ".hidden.jpg",
        ".DS_Store",
        "Thumbs.db",
        "notes.txt",
        "model.pt",
        "noextension",
        ".git/objects/x.png",
        ".ipynb_checkpoints/keep.png",
        "__MACOSX/._a.jpg",
        "__MACOSX/real.jpg",
        "sub/.cache/y.jpg",
    ]
    root = _tree(tmp_path / "data", ["a.jpg", "sub/b.png", *skipped], png_bytes)
    assert _relative(scan_images(root), root) == ["a.jpg", "sub/b.png"]


def test_folder_holding_run_marker_is_skipped_with_its_subtree(tmp_path, png_bytes):
    # Rule: our own output folders (marked by RUN_MARKER) are never read as training data.
    names = ["a.jpg", f"runs/r1/{RUN_MARKER}", "runs/r1/loss.png", "runs/r1/plots/x.png"]
    root = _tree(tmp_path / "data", names, png_bytes)
    assert _relative(scan_images(root), root) == ["a.jpg"]


def test_root_that_is_an_output_folder_raises(tmp_path, png_bytes):
    # Rule: pointing at a run folder is a mistake we name, rather than an empty listing.
    root = _tree(tmp_path / "run", [RUN_MARKER, "loss.png"], png_bytes)
    with pytest.raises(DataError, match="output folder"):
        scan_images(root)


def test_exclude_prunes_folders_and_files_given_in_any_spelling(tmp_path, png_bytes, monkeypatch):
    # Rule: excluded paths are compared resolved; an excluded folder drops its whole subtree.
    names = ["a.jpg", "b.jpg", "out/c.jpg", "out/deep/d.jpg", "keep/e.jpg"]
    root = _tree(tmp_path / "data", names, png_bytes)
    monkeypatch.chdir(root)
    found = scan_images(root, exclude=["out/../out", root / "b.jpg"])
    assert _relative(found, root) == ["a.jpg", "keep/e.jpg"]


def test_symlinked_folder_is_followed_and_listed_under_its_link_name(tmp_path, png_bytes):
    # Rule: a linked folder is walked; its files keep the path the user sees under root.
    outside = _tree(tmp_path / "elsewhere", ["x.jpg", "inner/y.png"], png_bytes)
    root = _tree(tmp_path / "data", ["a.jpg"], png_bytes)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    found = scan_images(root)
    assert _relative(found, root) == ["a.jpg", "linked/inner/y.png", "linked/x.jpg"]
    assert found[1] == root.absolute() / "linked" / "inner" / "y.png"


def test_symlink_loop_terminates_and_lists_each_file_once(tmp_path, png_bytes):
    # Rule: links back to an ancestor are not walked again; the scan ends.
    root = _tree(tmp_path / "data", ["a.jpg", "sub/b.jpg"], png_bytes)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)
    assert _relative(scan_images(root), root) == ["a.jpg", "sub/b.jpg"]


def test_file_reached_through_two_links_is_listed_once_under_first_name(tmp_path, png_bytes):
    # Rule: duplicates (by resolved path) keep the name that sorts first.
    shared = _tree(tmp_path / "shared", ["x.jpg"], png_bytes)
    root = _tree(tmp_path / "data", ["m/real.jpg"], png_bytes)
    (root / "b_link").symlink_to(shared, target_is_directory=True)
    (root / "a_link").symlink_to(shared, target_is_directory=True)
    (root / "alias.jpg").symlink_to(root / "m" / "real.jpg")
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    # A dangling image link is listed too, so decoding counts and names it as a skip.
    assert _relative(scan_images(root), root) == ["a_link/x.jpg", "alias.jpg", "dangling.jpg"]


def test_order_is_by_posix_relative_path_and_repeatable(tmp_path, png_bytes):
    # Rule: order is plain string order of the relative POSIX path, the same on every run.
    names = ["b.jpg", "a b.jpg", "a/c.jpg", "A.jpg", "a-b/d.jpg", "a/b/e.jpg", "10.jpg", "9.jpg"]
    root = _tree(tmp_path / "data", names, png_bytes)
    first = _relative(scan_images(root), root)
    assert first == sorted(names)
    assert first == ["10.jpg", "9.jpg", "A.jpg", "a b.jpg", "a-b/d.jpg", "a/b/e.jpg"] + [
        "a/c.jpg",
        "b.jpg",
    ]
    assert _relative(scan_images(root), root) == first


def test_spaces_and_non_ascii_names_are_listed(tmp_path, png_bytes):
    # Rule: names are taken as they are: spaces, accents, CJK and emoji all work.
    names = ["my photos/beach day.jpg", "café/crème brûlée.png", "写真/猫.jpg", "🐱.jpg"]
    root = _tree(tmp_path / "data", names, png_bytes)
    found = scan_images(root)
    assert _relative(found, root) == sorted(names)
    assert all(path.is_file() for path in found)


def test_relative_root_gives_absolute_unresolved_paths(tmp_path, png_bytes, monkeypatch):
    # Rule: results do not depend on the working directory later and keep link names.
    _tree(tmp_path / "data", ["a.jpg"], png_bytes)
    (tmp_path / "via").symlink_to(tmp_path / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert scan_images("via") == [tmp_path / "via" / "a.jpg"]


def test_unreadable_folder_is_skipped_with_a_warning(tmp_path, png_bytes, monkeypatch, caplog):
    # Rule: a folder we may not list is skipped with a warning; the rest is still found.
    root = _tree(tmp_path / "data", ["a.jpg", "locked/b.jpg"], png_bytes)
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, so the refusal is faked
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(images.os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger=images.__name__):
        assert _relative(scan_images(root), root) == ["a.jpg"]
    assert "locked" in caplog.text and "Permission denied" in caplog.text


def test_missing_root_raises_data_error(tmp_path):
    # Rule: a missing input folder is a one-line DataError naming the path.
    with pytest.raises(DataError, match="no such folder") as caught:
        scan_images(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(caught.value) and "\n" not in str(caught.value)


def test_file_as_root_raises_data_error(tmp_path, png_bytes):
    # Rule: a file where a folder is expected is a DataError saying so.
    path = tmp_path / "one.png"
    path.write_bytes(png_bytes)
    with pytest.raises(DataError, match="folder of images is expected"):
        scan_images(path)


def test_empty_folder_gives_empty_list(tmp_path):
    # Rule: scan_images lists; deciding that nothing found is an error is the caller's job.
    assert scan_images(tmp_path) == []


# ---------------------------------------------------------------- load_canvas


def test_landscape_photo_fills_width_and_pads_below_with_zeros(tmp_path):
    # Rule: longer side == size, aspect kept, image top-left, the rest of the canvas zero.
    photo = Image.fromarray(skdata.chelsea())  # 451 x 300
    path = _save(photo, tmp_path / "chelsea.png")
    canvas, (height, width) = load_canvas(path, 64)
    assert canvas.shape == (3, 64, 64) and canvas.dtype == np.uint8
    assert (height, width) == (round(300 * 64 / 451), 64)
    assert (canvas[:, height:, :] == 0).all()
    expected = np.asarray(photo.resize((width, height), Image.Resampling.BILINEAR))
    assert _mean_abs_diff(canvas[:, :height, :width].transpose(1, 2, 0), expected) < 4


def test_portrait_photo_fills_height_and_pads_right(tmp_path):
    # Rule: for a tall image the height is the longer side and padding is on the right.
    photo = Image.fromarray(skdata.coffee()).transpose(Image.Transpose.ROTATE_90)  # 400 x 600
    path = _save(photo, tmp_path / "coffee.png")
    canvas, (height, width) = load_canvas(path, 48)
    assert (height, width) == (48, 32)
    assert (canvas[:, :, width:] == 0).all()
    assert canvas[:, :, :width].std() > 20


def test_small_image_is_enlarged_to_the_canvas(tmp_path, astronaut):
    # Rule: images smaller than the canvas are scaled up so the longer side still equals size.
    path = _save(astronaut.resize((20, 10)), tmp_path / "small.png")
    canvas, valid = load_canvas(path, 64)
    assert valid == (32, 64)
    assert (canvas[:, 32:, :] == 0).all() and canvas[:, :32, :].std() > 10


@pytest.mark.parametrize(
    ("image_size", "valid"),
    [((1000, 10), (1, 64)), ((10, 1000), (64, 1)), ((4000, 5), (1, 64)), ((1, 1), (64, 64))],
)
def test_extreme_aspect_ratios_and_single_pixel_keep_each_side_at_least_one(
    tmp_path, cat, image_size, valid
):
    # Rule: the shorter side is max(1, round(...)); a 1x1 image fills the whole canvas.
    path = _save(cat.resize(image_size), tmp_path / "odd.png")
    canvas, got = load_canvas(path, 64)
    assert canvas.shape == (3, 64, 64)
    assert got == valid
    assert (canvas[:, got[0] :, :] == 0).all() and (canvas[:, :, got[1] :] == 0).all()


@pytest.mark.parametrize(
    ("source_size", "canvas"),
    [
        ((451, 300), 192),
        ((1000, 665), 192),
        ((451, 300), 64),
        ((1999, 1333), 192),
        ((4001, 3001), 96),
        ((20, 500), 96),
        ((13, 500), 96),
        ((60, 40), 192),
    ],
    ids=[
        "shrink-2x",
        "shrink-5x",
        "shrink-7x",
        "shrink-10x",
        "shrink-42x",
        "strip-5x",
        "strip-6.5x-across",
        "enlarge-3x",
    ],
)
@pytest.mark.parametrize("torch_resize", [True, False], ids=["torch", "pillow"])
def test_canvas_matches_pillows_own_resize(
    tmp_path, monkeypatch, source_size, canvas, torch_resize
):
    # Rule: the canvas is Pillow's exact resize (antialiased bilinear down, bicubic up) to
    # within 2 levels, whichever library resizes on this CPU. Where either side shrinks 6x
    # or more (a thin strip across its width too), Pillow's block-averaging shortcut runs
    # on every CPU; torch never resizes those, so the two ways cannot part there.
    monkeypatch.setattr(images, "_VECTORISED_UINT8_RESIZE", torch_resize)
    monkeypatch.setattr(images, "_TORCH_RESIZE_MIN_SIDE", 1)
    photo = Image.fromarray(skdata.chelsea()).resize(source_size, Image.Resampling.LANCZOS)
    path = _save(photo, tmp_path / "chelsea.png")
    pixels, (height, width) = load_canvas(path, canvas)
    method = Image.Resampling.BILINEAR if max(source_size) > canvas else Image.Resampling.BICUBIC
    exact = np.asarray(photo.resize((width, height), method)).astype(int)
    got = pixels[:, :height, :width].transpose(1, 2, 0).astype(int)
    if max(source_size[0] / width, source_size[1] / height) < 6:
        assert np.abs(got - exact).max() <= 2
    else:
        shortcut = photo.resize((width, height), method, reducing_gap=3.0)
        assert np.array_equal(got, np.asarray(shortcut).astype(int))
    assert (pixels[:, height:, :] == 0).all() and (pixels[:, :, width:] == 0).all()


def test_jpeg_draft_speeds_up_without_changing_the_result(tmp_path):
    # Rule: reduced-scale JPEG decoding keeps the longer side >= size and the canvas close to
    # a full decode.
    photo = Image.fromarray(skdata.coffee())  # 600 x 400
    jpeg = _save(photo, tmp_path / "coffee.jpg", quality=95)
    png = _save(Image.open(jpeg).convert("RGB"), tmp_path / "coffee.png")  # same pixels, no draft
    drafted = decode_image(jpeg, draft_size=64)
    assert 64 <= max(drafted.size) < 600
    assert decode_image(jpeg, draft_size=600).size == (600, 400)
    canvas_jpeg, valid_jpeg = load_canvas(jpeg, 64)
    canvas_png, valid_png = load_canvas(png, 64)
    assert valid_jpeg == valid_png == (43, 64)
    assert _mean_abs_diff(canvas_jpeg, canvas_png) < 4


def test_canvas_applies_exif_orientation(tmp_path, cat):
    # Rule: the canvas shows the image upright, so a 90-degree EXIF turn swaps the valid sides.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(cat, tmp_path / "cat.jpg", exif=exif.tobytes())  # 90 x 60 stored
    _canvas, valid = load_canvas(path, 45)
    assert valid == (45, 30)


def test_canvas_size_below_one_is_rejected(tmp_path, cat):
    # Rule: a canvas needs at least one pixel.
    path = _save(cat, tmp_path / "cat.png")
    with pytest.raises(ValueError, match="at least 1"):
        load_canvas(path, 0)


def test_canvas_decode_failure_is_an_image_decode_error(tmp_path):
    # Rule: load_canvas reports bad files the same way decode_image does.
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ImageDecodeError):
        load_canvas(path, 32)
