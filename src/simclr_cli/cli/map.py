"""`simclr map`: the whole collection laid out in 2-D, as a PNG and an offline HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import QuietOption, VerboseOption, check_output, user_errors
from simclr_cli.cli.neighbors import IndexOption
from simclr_cli.threads import let_idle_threads_sleep


def map_command(
    index: IndexOption,
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Map .png; the interactive .html is written beside it."),
    ] = Path("map.png"),
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="pca, umap (needs the \\[umap] extra) or auto (umap when installed).",
        ),
    ] = "auto",
    max_thumbnails: Annotated[
        int,
        typer.Option("--max-thumbnails", min=0, help="Most thumbnails drawn on the PNG."),
    ] = 600,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Lay the images out so that similar ones sit together; hover the HTML for file names."""
    let_idle_threads_sleep()  # before torch loads (simclr_cli/threads.py)
    from simclr_cli.console import output_console, setup_logging
    from simclr_cli.engine.embeddings import load_embeddings
    from simclr_cli.engine.layout import compute_layout, draw_map_png, write_map_html

    setup_logging(verbose=verbose, quiet=quiet)
    with user_errors():
        check_output(out, folder=False)
        embeddings = load_embeddings(index)
        positions = compute_layout(embeddings.vectors, method=layout)
        png, drawn = draw_map_png(positions, embeddings.paths, out, max_thumbnails=max_thumbnails)
        page, _ = write_map_html(positions, embeddings.paths, out.with_suffix(".html"))
    output_console().print(
        f"{embeddings.rows} images laid out by {positions.method}: {png} ({drawn} thumbnails), "
        f"{page} (offline; hover for file names)",
        highlight=False,
        markup=False,
    )
