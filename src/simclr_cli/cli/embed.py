"""`simclr embed`: one feature vector per image from a frozen, pretrained encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import (
    DeviceOption,
    ForwardBatchOption,
    MaxPixelsOption,
    ModelOption,
    PrecisionOption,
    QuietOption,
    StrictOption,
    VerboseOption,
    WorkersOption,
    user_errors,
)
from simclr_cli.threads import let_idle_threads_sleep


def embed_command(
    data: Annotated[
        Path, typer.Argument(help="Folder of images (scanned recursively).", show_default=False)
    ],
    model: ModelOption,
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Output .npy; a .manifest.csv and a .json are written beside it."
        ),
    ] = Path("embeddings.npy"),
    projection: Annotated[
        bool,
        typer.Option(
            "--projection",
            help="Write the projection head's output instead of the encoder features.",
        ),
    ] = False,
    normalize: Annotated[
        bool,
        typer.Option(
            "--normalize", help="L2-normalise every row (cosine similarity becomes a dot product)."
        ),
    ] = False,
    batch_size: ForwardBatchOption = 256,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    workers: WorkersOption = None,
    strict: StrictOption = False,
    max_pixels: MaxPixelsOption = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Embed every image in a folder; rows follow the manifest, in the folder's sorted order."""
    let_idle_threads_sleep()  # before torch loads (simclr_cli/threads.py)
    from simclr_cli.console import error_console, make_reporter, output_console, setup_logging
    from simclr_cli.engine.embed import EmbedOptions, embed_folder
    from simclr_cli.engine.interrupts import interrupt_on_signal

    setup_logging(verbose=verbose, quiet=quiet)
    options = EmbedOptions(
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=workers,
        projection=projection,
        l2_normalize=normalize,
        strict=strict,
        max_pixels=max_pixels,
    )
    with user_errors():
        try:
            with interrupt_on_signal():
                result = embed_folder(
                    data, model, out, options=options, reporter=make_reporter(quiet=quiet)
                )
        except KeyboardInterrupt:
            error_console().print(
                "interrupted: the rows done so far are kept; run the same command again to "
                "continue",
                highlight=False,
                markup=False,
            )
            raise typer.Exit(code=130) from None
    output_console().print(
        f"wrote {result.rows} x {result.dim} float32 rows to {result.array_path} "
        f"({len(result.skipped)} skipped) in {result.seconds:.1f} s; "
        f"rows map to files in {result.manifest_path}",
        highlight=False,
        markup=False,
    )
