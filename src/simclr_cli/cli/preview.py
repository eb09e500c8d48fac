"""`simclr augment-preview`: look at the views pretraining would make of an image."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from simclr_cli.cli._augment import (
    BlurProbOption,
    CropMinAreaOption,
    FlipProbOption,
    ImageSizeOption,
    JitterStrengthOption,
    augment_choices,
)
from simclr_cli.cli._common import MaxPixelsOption, check_output, user_errors

if TYPE_CHECKING:
    from simclr_cli.config import AugmentConfig


def augment_preview_command(
    image: Annotated[Path, typer.Argument(help="An image file.", show_default=False)],
    pairs: Annotated[int, typer.Option("-n", "--pairs", min=1, max=32, help="Pairs of views.")] = 8,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="PNG to write.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same picture.")] = 0,
    run: Annotated[
        Path | None,
        typer.Option(
            "--run", help="Take the augmentation settings of this pretraining run folder."
        ),
    ] = None,
    image_size: ImageSizeOption = None,
    crop_min_area: CropMinAreaOption = None,
    flip_prob: FlipProbOption = None,
    jitter_strength: JitterStrengthOption = None,
    blur_prob: BlurProbOption = None,
    show: Annotated[
        bool, typer.Option("--show", help="Also draw a small preview in the terminal.")
    ] = False,
    max_pixels: MaxPixelsOption = None,
) -> None:
    """Write a grid of the original and N pairs of training views, each labelled."""
    from simclr_cli.console import output_console
    from simclr_cli.engine.preview import write_preview

    choices = augment_choices(
        image_size=image_size,
        crop_min_area=crop_min_area,
        flip_prob=flip_prob,
        jitter_strength=jitter_strength,
        blur_prob=blur_prob,
    )
    with user_errors():
        augment = _augment_config(run, choices)
        out_path = out or Path(f"{image.stem}-views.png")
        check_output(out_path, folder=False)
        result = write_preview(
            image, augment, out_path, pairs=pairs, seed=seed, max_pixels=max_pixels
        )
    console = output_console()
    console.print(
        f"wrote {result.path}: the original ({result.original_size[0]}x"
        f"{result.original_size[1]}) and {pairs} pair{'s' if pairs != 1 else ''} of views at "
        f"{augment.image_size} px",
        highlight=False,
        markup=False,
    )
    if show:
        _show_in_terminal(result.path)


def _augment_config(run: Path | None, choices: dict[str, Any]) -> AugmentConfig:
    import dataclasses
    import json

    from simclr_cli.config import AugmentConfig
    from simclr_cli.errors import ConfigError
    from simclr_cli.models.export import RUN_CONFIG_NAME

    if run is None:
        return AugmentConfig(**choices)
    path = run / RUN_CONFIG_NAME
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["augment"]
    except (OSError, KeyError, ValueError):
        raise ConfigError(
            f"{run}: not a pretraining run folder (no readable {RUN_CONFIG_NAME})"
        ) from None
    names = {f.name for f in dataclasses.fields(AugmentConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
    return AugmentConfig(**{**values, **choices})


def _show_in_terminal(png: Path) -> None:
    """Half-block rendering: each character cell shows two pixels, top and bottom."""
    import numpy as np
    from PIL import Image
    from rich.text import Text

    from simclr_cli.console import output_console

    console = output_console()
    if not console.is_terminal:
        console.print("(--show draws only on a terminal)", highlight=False, markup=False)
        return
    with Image.open(png) as image:
        rgb = image.convert("RGB")
    width = max(20, min(console.width, 200))
    height = max(2, round(rgb.height * width / rgb.width / 2) * 2)
    pixels = np.asarray(rgb.resize((width, height), Image.Resampling.BOX))  # (H, W, 3)
    text = Text()
    for y in range(0, height, 2):
        for x in range(width):
            (r1, g1, b1), (r2, g2, b2) = pixels[y, x], pixels[y + 1, x]
            text.append("▀", style=f"rgb({r1},{g1},{b1}) on rgb({r2},{g2},{b2})")
        text.append("\n")
    console.print(text, end="")
