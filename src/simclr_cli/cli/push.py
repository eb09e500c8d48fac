"""`simclr push`: upload a run's encoder, config, loss plot and a model card to the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from simclr_cli.cli._common import QuietOption, VerboseOption, user_errors


def push_command(
    run: Annotated[
        Path, typer.Argument(help="Run folder (or model folder) to upload.", show_default=False)
    ],
    repo_id: Annotated[
        str, typer.Argument(help="Hub repository, owner/name (created if missing).")
    ],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository as private.")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option("--revision", help="Branch to commit to (created if missing; default main)."),
    ] = None,
    with_head: Annotated[
        bool, typer.Option("--with-head", help="Also upload the projection head.")
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            help="Dataset name for the card's metadata (default: the data folder's name).",
        ),
    ] = None,
    verbose: VerboseOption = False,
    quiet: QuietOption = False,
) -> None:
    """Publish a trained encoder; the token comes from HF_TOKEN or `hf auth login`."""
    from simclr_cli.console import output_console, setup_logging
    from simclr_cli.engine.publish import push_run

    setup_logging(verbose=verbose, quiet=quiet)
    with user_errors():
        result = push_run(
            run,
            repo_id,
            private=private,
            revision=revision,
            include_head=with_head,
            dataset=dataset,
        )
    output_console().print(
        f"pushed {', '.join(result.files)} to {result.url}", highlight=False, markup=False
    )
