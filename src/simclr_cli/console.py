"""Terminal output: results on stdout, progress and logs on stderr.

rich is imported lazily so `simclr --help` stays quick. When either stream is not a terminal
(CI logs, `| tee`), progress falls back to plain lines and logs to plain text.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, TextIO

from simclr_cli.engine.progress import PlainReporter, Reporter, format_metric

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "RichReporter",
    "error_console",
    "keep_going_when_the_reader_leaves",
    "make_reporter",
    "output_console",
    "setup_logging",
]

_consoles: dict[str, Console] = {}


def output_console() -> Console:
    """The stdout console, for results and tables."""
    if "out" not in _consoles:
        from rich.console import Console

        _consoles["out"] = Console(soft_wrap=True)
    return _consoles["out"]


def error_console() -> Console:
    """The stderr console, for progress, logs and errors."""
    if "err" not in _consoles:
        from rich.console import Console

        _consoles["err"] = Console(stderr=True, soft_wrap=True)
    return _consoles["err"]


class _SurvivingStream(io.TextIOBase):
    """A standard stream that goes quiet, instead of raising, once its reader has gone.

    `simclr pretrain ... 2>&1 | head` closes the pipe after a few lines; Python then raises
    BrokenPipeError on the next progress line, which used to end hours of training with no
    message (there is nowhere left to print one). The work matters more than its log: the
    stream's descriptor is pointed at the null device and the command carries on.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._reader_gone = False

    def write(self, text: str) -> int:
        if not self._reader_gone:
            try:
                self._stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self._reader_gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._silence()

    def _silence(self) -> None:
        self._reader_gone = True
        # Also what the interpreter flushes at exit; otherwise it reports the broken pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors


def keep_going_when_the_reader_leaves() -> None:
    """Wrap stdout and stderr so that a closed pipe silences output instead of the command."""
    if not isinstance(sys.stdout, _SurvivingStream):
        sys.stdout = _SurvivingStream(sys.stdout)
    if not isinstance(sys.stderr, _SurvivingStream):
        sys.stderr = _SurvivingStream(sys.stderr)


def interactive() -> bool:
    """True when both streams are terminals, so a live progress bar can be drawn."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class _PlainFormatter(logging.Formatter):
    """`warning: ...`, in the same case as the engine's own warning lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """Install one handler on the package logger; --verbose shows debug, --quiet errors only."""
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO
    package_logger = logging.getLogger("simclr_cli")
    package_logger.handlers.clear()
    package_logger.setLevel(level)
    package_logger.propagate = False
    handler: logging.Handler
    if interactive():
        from rich.logging import RichHandler

        handler = RichHandler(console=error_console(), show_path=False, show_time=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter())
    package_logger.addHandler(handler)


def make_reporter(*, quiet: bool = False) -> Reporter:
    """A live progress bar on a terminal, plain lines elsewhere."""
    if quiet:
        from simclr_cli.engine.progress import NullReporter

        return NullReporter()
    if interactive():
        return RichReporter()
    return PlainReporter(sys.stderr, interval_s=15.0)


class RichReporter:
    """A rich progress bar with the loop's metrics beside it."""

    def __init__(self) -> None:
        """Create lazily; nothing is drawn until `start`."""
        self._progress: Any = None
        self._task_id: Any = None

    def start(self, *, task: str, total: int, completed: int = 0, unit: str = "step") -> None:
        """Draw a new bar for this phase."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.stop()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{unit}s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=error_console(),
        )
        self._progress.start()
        self._task_id = self._progress.add_task(task, total=total, completed=completed, metrics="")

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        """Move the bar and refresh the metrics text."""
        if self._progress is None:
            return
        shown = "  ".join(f"{k} {format_metric(v)}" for k, v in metrics.items())
        self._progress.update(self._task_id, completed=completed, metrics=shown)

    def message(self, text: str) -> None:
        """Print a line above the bar."""
        console = self._progress.console if self._progress is not None else error_console()
        console.print(text, highlight=False, markup=False)

    def stop(self) -> None:
        """Remove the live display, leaving the last state on screen."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
