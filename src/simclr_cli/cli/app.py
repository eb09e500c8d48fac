"""The `simclr` command: composes one Typer command per module.

Command modules import torch and the engine inside their functions, so `simclr --help`
and `simclr --version` stay fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from simclr_cli import __version__
from simclr_cli.cli.convert import convert_command
from simclr_cli.cli.demo import demo_command
from simclr_cli.cli.duplicates import duplicates_command
from simclr_cli.cli.embed import embed_command
from simclr_cli.cli.eval import eval_command
from simclr_cli.cli.finetune import finetune_command
from simclr_cli.cli.map import map_command
from simclr_cli.cli.neighbors import neighbors_command
from simclr_cli.cli.predict import predict_command
from simclr_cli.cli.pretrain import pretrain_command
from simclr_cli.cli.preview import augment_preview_command
from simclr_cli.cli.push import push_command

app = typer.Typer(
    name="simclr",
    help="SimCLR self-supervised learning for a folder of images.",
    no_args_is_help=True,
    add_completion=False,
    # Locals in tracebacks can hold tokens and paths; never show them.
    pretty_exceptions_show_locals=False,
)
app.command("pretrain")(pretrain_command)
app.command("embed")(embed_command)
app.command("eval")(eval_command)
app.command("finetune")(finetune_command)
app.command("predict")(predict_command)
app.command("augment-preview")(augment_preview_command)
app.command("demo")(demo_command)
app.command("convert")(convert_command)
app.command("push")(push_command)
app.command("neighbors")(neighbors_command)
app.command("duplicates")(duplicates_command)
app.command("map")(map_command)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"simclr-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """SimCLR self-supervised learning for a folder of images."""


def main() -> None:
    """Console-script entry point."""
    from simclr_cli.allocator import keep_freed_memory, setting_problem
    from simclr_cli.console import keep_going_when_the_reader_leaves

    keep_going_when_the_reader_leaves()
    problem = setting_problem()
    if problem is not None:
        print(f"warning: {problem}", file=sys.stderr)
    # Before any tensor exists; the process is ours, so process-wide malloc settings are too.
    keep_freed_memory()
    app()
