"""`simclr convert`: any supported checkpoint into a model folder (safetensors + config.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import QuietOption, VerboseOption, user_errors


def convert_command(
    source: Annotated[
        str,
        typer.Argument(
            help="Run folder, model folder, weights file (.pth/.pt/.bin/.safetensors) or Hub "
            "repo (owner/name\\[@revision]).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.", show_default=False)],
    normalization: Annotated[
        str | None,
        typer.Option(
            "--normalization",
            help="imagenet or none ([0, 1] inputs): override the guess (none for the official "
            "SimCLR weights, imagenet for other checkpoints).",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", min=8, max=1024, help="Input side to record (default 224)."),
    ] = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Write a checkpoint from this or another project as model.safetensors + config.json."""
    from simclr_cli.console import output_console, setup_logging
    from simclr_cli.engine.publish import convert_model

    setup_logging(verbose=verbose, quiet=quiet)
    with user_errors():
        model = convert_model(source, out, normalization=normalization, image_size=image_size)
    pre = model.config["preprocessing"]
    output_console().print(
        f"wrote {out}: {model.config['arch']}, {model.backbone.feature_dim}-d features, "
        f"{model.image_size} px inputs, mean {pre['mean']} std {pre['std']}"
        + (", with projection head" if model.projection_head is not None else ""),
        highlight=False,
        markup=False,
    )
