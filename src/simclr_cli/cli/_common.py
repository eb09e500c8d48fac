"""Pieces every command shares: error handling and the options that mean the same everywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from simclr_cli.errors import ConfigError, SimclrError, output_location_problem

DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
]
WorkersOption = Annotated[
    int | None,
    typer.Option(
        "--workers", min=0, help="Image-decoding processes (default: spare cores, max 8)."
    ),
]
StrictOption = Annotated[
    bool,
    typer.Option("--strict", help="Stop at the first unreadable image instead of skipping it."),
]
PrecisionOption = Annotated[
    str, typer.Option(help="auto (bf16/fp16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16.")
]
ForwardBatchOption = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")]


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn engine errors into one line on stderr and exit status 1 (no traceback)."""
    from simclr_cli.console import error_console

    try:
        yield
    except SimclrError as error:
        print_error(error)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        error_console().print("interrupted", highlight=False, markup=False)
        raise typer.Exit(code=130) from None
    except RuntimeError as error:
        # A decoding worker killed while the main process was busy elsewhere (a training
        # step): torch raises from its signal handler, outside the loader's own handling.
        from simclr_cli.data.loader import worker_failure
        from simclr_cli.errors import out_of_memory_message

        failure = out_of_memory_message(error) or worker_failure(error)
        if failure is None:
            raise
        print_error(failure)
        raise typer.Exit(code=1) from None


def print_error(message: object) -> None:
    """`error: MESSAGE` on stderr, the message shown as written.

    Messages carry file names and install hints (`pip install "simclr-cli[umap]"`); as rich
    markup their brackets would vanish, or a name like `x[/b]` would crash the print.
    """
    from rich.text import Text

    from simclr_cli.console import error_console

    error_console().print(Text.assemble(("error:", "bold red"), f" {message}"), highlight=False)


def given(**options: Any) -> dict[str, Any]:
    """Only the options the user set, so config defaults stay the single source of truth."""
    return {name: value for name, value in options.items() if value is not None}


MaxPixelsOption = Annotated[
    int | None,
    typer.Option(
        "--max-pixels",
        min=1,
        help="Skip images with more pixels than this as possible decompression bombs "
        "(default: Pillow's limit, about 179 million); raise it to admit huge scans.",
    ),
]

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Run folder, model folder (model.safetensors + config.json), weights file, or "
        "Hugging Face Hub repo: owner/name, owner/name@revision, hf://owner/name.",
        show_default=False,
    ),
]


def absolute_if_local(model: str | None) -> str | None:
    """A --model/--init value as a run stores it: local paths absolute, Hub ids as given.

    Absolute paths let a run be resumed from any directory.
    """
    from pathlib import Path

    if model is None:
        return None
    local = Path(model)
    return str(local.absolute()) if local.exists() else model


def check_output(path: Path, *, folder: bool) -> None:
    """Fail before any work when the output cannot be written where -o puts it.

    A file standing where the output (or a folder above it) goes, a folder we may not write,
    a read-only mount. The commands write only at the end of their work; without this a typo
    in -o would cost the whole run. A full disk is still reported where it happens.
    """
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; -o/--out needs a folder there")
    if not folder and path.is_dir():
        raise ConfigError(f"{path} is a folder; -o/--out names a file there")
    problem = output_location_problem(path)
    if problem:
        raise ConfigError(f"cannot write {path}: {problem}")
