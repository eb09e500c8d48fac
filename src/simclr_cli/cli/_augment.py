"""Augmentation options shared by `pretrain` and `augment-preview`.

One definition, so a user can tune the views by looking at them, then train with exactly the
same flags.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from simclr_cli.cli._common import given

AUGMENT_PANEL = "Augmentation"

ImageSizeOption = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        "--size",
        help=(
            "Training resolution (default: 224; 96 trains far faster on a CPU). In pretraining, "
            "64 or less switches to the small-image stem, which is slower per image."
        ),
        rich_help_panel=AUGMENT_PANEL,
    ),
]
CropMinAreaOption = Annotated[
    float | None,
    typer.Option(
        help="Smallest crop, as a fraction of the image (default: 0.08).",
        rich_help_panel=AUGMENT_PANEL,
    ),
]
FlipProbOption = Annotated[
    float | None,
    typer.Option(
        help="Horizontal flip probability (default: 0.5; 0 for text or digits).",
        rich_help_panel=AUGMENT_PANEL,
    ),
]
JitterStrengthOption = Annotated[
    float | None,
    typer.Option(
        "--jitter-strength",
        "--strength",
        help="Colour jitter strength s (default: 1.0; the paper uses 0.5 on CIFAR-10).",
        rich_help_panel=AUGMENT_PANEL,
    ),
]
BlurProbOption = Annotated[
    float | None,
    typer.Option(
        help="Gaussian blur probability (default: 0.5 above 64 px, else 0).",
        rich_help_panel=AUGMENT_PANEL,
    ),
]


def augment_choices(
    *,
    image_size: int | None,
    crop_min_area: float | None,
    flip_prob: float | None,
    jitter_strength: float | None,
    blur_prob: float | None,
) -> dict[str, Any]:
    """AugmentConfig fields the user set on the command line."""
    return given(
        image_size=image_size,
        flip_prob=flip_prob,
        jitter_strength=jitter_strength,
        blur_prob=blur_prob,
        # `is not None`: 0 must reach the config's check, not fall back to the default.
        crop_area=(crop_min_area, 1.0) if crop_min_area is not None else None,
    )
