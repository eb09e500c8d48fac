"""Pairs of training views of one image, drawn by the training code itself, as a labelled grid.

The views come from `sample_view_params` and `apply_view`, on the same decoded canvas a
training batch would hold; only the seed differs (a preview stream instead of a step's).
Pretraining draws its parameters with the same `sample_view_params` and runs the same steps:
through `apply_view` under `torchrun` or `--chunk-size`, and through `make_view_batch`
otherwise, which finishes both views as one batch and normalises them, pixel for pixel the
same (tests/data/test_augment.py). What the picture shows is therefore what the encoder is
trained on, crop sizes, colours and blur included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from simclr_cli.config import AugmentConfig, blur_probability, decode_size
from simclr_cli.data.augment import ViewParams, apply_view, sample_view_params
from simclr_cli.data.images import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    load_canvas,
    raise_pillow_pixel_limit,
)
from simclr_cli.errors import ConfigError, os_error_reason
from simclr_cli.seeding import generator_for

__all__ = ["PreviewResult", "describe_view", "preview_views", "write_preview"]


@dataclass(frozen=True)
class PreviewResult:
    """The picture written, and what was drawn for each tile."""

    path: Path
    original_size: tuple[int, int]  # (width, height) of the decoded file
    labels: list[tuple[str, str]]  # (view a, view b) description per pair


def preview_views(
    image_path: Path,
    augment: AugmentConfig,
    *,
    pairs: int,
    seed: int,
    max_pixels: int | None = None,
) -> tuple[
    np.ndarray,
    torch.Tensor,
    list[tuple[ViewParams, ViewParams]],
    tuple[int, int],
    tuple[float, float],
]:
    """Decode the image once and draw `pairs` pairs of views with the training functions.

    Returns:
        The decoded image as (H, W, 3) uint8, the views (2 * pairs, 3, S, S) in [0, 1]
        ordered a0, b0, a1, b1..., each pair's parameters, the (width, height) of the file,
        and the (x, y) factors from canvas pixels to file pixels. The two differ where the
        shorter side was rounded to few canvas pixels (a 1000x10 strip is 64x1 at 64 px).
    """
    if pairs < 1:
        raise ConfigError("ask for at least one pair of views (-n 1)")
    limit = max_pixels or DEFAULT_MAX_PIXELS
    if limit > DEFAULT_MAX_PIXELS:
        raise_pillow_pixel_limit(limit)  # as the training loader does for the same option
    original = decode_image(image_path, max_pixels=limit)  # RGB, EXIF-oriented
    canvas, (height, width) = load_canvas(image_path, decode_size(augment), max_pixels=limit)
    to_file = (original.width / width, original.height / height)
    canvases = torch.from_numpy(canvas)[None].expand(pairs, -1, -1, -1)  # (n, 3, C, C)
    sizes = torch.tensor([[height, width]]).expand(pairs, -1)
    generator = generator_for(seed, "augment-preview")
    # Same order as a training step: all first views' parameters, then all second views'.
    params_a = sample_view_params(augment, sizes, generator)
    params_b = sample_view_params(augment, sizes, generator)
    views_a = apply_view(canvases, params_a, augment)
    views_b = apply_view(canvases, params_b, augment)
    views = torch.stack([views_a, views_b], dim=1).flatten(0, 1)  # (2n, 3, S, S)
    per_pair = [(_select(params_a, i), _select(params_b, i)) for i in range(pairs)]
    return np.asarray(original), views, per_pair, original.size, to_file


def _select(params: ViewParams, index: int) -> ViewParams:
    return ViewParams(
        **{name: value[index : index + 1] for name, value in vars(params).items()}  # (1, ...)
    )


def describe_view(params: ViewParams, *, to_file: tuple[float, float], area: float) -> str:
    """What was drawn for one view, in file pixels, as short lines for a tile caption."""
    x0, y0, w, h = (float(v) for v in params.crop_boxes[0])
    x0, w = x0 * to_file[0], w * to_file[0]
    y0, h = y0 * to_file[1], h * to_file[1]
    share = 100 * (w * h) / area if area else 0.0
    lines = [f"crop {w:.0f}x{h:.0f} at ({x0:.0f},{y0:.0f}), {share:.0f}%"]
    if bool(params.jitter[0]):
        lines.append(
            f"jitter b{float(params.brightness[0]):.2f} c{float(params.contrast[0]):.2f} "
            f"s{float(params.saturation[0]):.2f} h{float(params.hue[0]):+.2f}"
        )
    else:
        lines.append("no jitter")
    extras = []
    if bool(params.flip[0]):
        extras.append("flipped")
    if bool(params.grayscale[0]):
        extras.append("gray")
    extras.append(
        f"blur s={float(params.blur_sigma[0]):.2f}" if bool(params.blur[0]) else "no blur"
    )
    lines.append(", ".join(extras))
    return "\n".join(lines)


def write_preview(
    image_path: Path,
    augment: AugmentConfig,
    out_path: Path,
    *,
    pairs: int = 8,
    seed: int = 0,
    max_pixels: int | None = None,
) -> PreviewResult:
    """Draw the original and `pairs` labelled pairs of views into a PNG at `out_path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    original, views, per_pair, (width, height), to_file = preview_views(
        image_path, augment, pairs=pairs, seed=seed, max_pixels=max_pixels
    )
    area = float(width * height)
    tiles = views.permute(0, 2, 3, 1).clamp(0, 1).numpy()  # (2n, S, S, 3)
    columns = pairs + 1
    figure, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 6.2), squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    axes[0, 0].imshow(
        original, interpolation="nearest" if max(width, height) < 64 else "antialiased"
    )
    axes[0, 0].set_title("original", fontsize=9)
    axes[0, 0].set_xlabel(f"{width}x{height} px", fontsize=7)
    axes[1, 0].axis("off")
    axes[1, 0].text(
        0.0,
        0.95,
        _settings_text(augment, seed),
        fontsize=7,
        va="top",
        family="monospace",
        transform=axes[1, 0].transAxes,
    )
    labels = []
    for pair, (params_a, params_b) in enumerate(per_pair):
        texts = []
        for row, params in enumerate((params_a, params_b)):
            axis = axes[row, pair + 1]
            axis.imshow(tiles[2 * pair + row], interpolation="nearest")
            text = describe_view(params, to_file=to_file, area=area)
            axis.set_xlabel(text, fontsize=6)
            if row == 0:
                axis.set_title(f"pair {pair + 1}", fontsize=9)
            texts.append(text)
        labels.append((texts[0], texts[1]))
    # Two short lines, so the title fits even the narrow figure of -n 1 or -n 2.
    figure.suptitle(
        f"{image_path.name}: {pairs} positive pair{'s' if pairs > 1 else ''} at "
        f"{augment.image_size} px\nas pretraining draws them; a column is two views",
        fontsize=9,
    )
    figure.tight_layout(h_pad=2.5)  # room for the three caption lines under the top row
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out_path, dpi=110)
    except OSError as error:
        raise ConfigError(f"cannot write {out_path}: {os_error_reason(error)}") from None
    finally:
        plt.close(figure)
    return PreviewResult(out_path, (width, height), labels)


def _settings_text(augment: AugmentConfig, seed: int) -> str:
    return "\n".join(
        [
            f"size      {augment.image_size}",
            f"crop area {augment.crop_area[0]:g}-{augment.crop_area[1]:g}",
            f"flip p    {augment.flip_prob:g}",
            f"jitter    s={augment.jitter_strength:g} p={augment.jitter_prob:g}",
            f"gray p    {augment.grayscale_prob:g}",
            f"blur p    {blur_probability(augment):g}",
            f"seed      {seed}",
        ]
    )
