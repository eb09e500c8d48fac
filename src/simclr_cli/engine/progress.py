"""How loops report progress, without depending on any terminal library.

Loops call a `Reporter`. `PlainReporter` writes one readable line per interval, for logs and
pipes; the command line supplies a rich progress bar when stdout is a terminal.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

__all__ = ["NullReporter", "PlainReporter", "Reporter", "format_duration"]


class Reporter(Protocol):
    """Receives progress from a loop; every method must be cheap."""

    def start(self, *, task: str, total: int, completed: int = 0, unit: str = "step") -> None:
        """A phase of `total` units begins (some may be done already, after a resume)."""

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        """`completed` units are done; `metrics` are shown beside the bar."""

    def message(self, text: str) -> None:
        """A line worth keeping (an epoch summary, a saved checkpoint)."""

    def stop(self) -> None:
        """The phase ended (finished or interrupted)."""


def format_duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainReporter:
    """Plain lines at most every `interval_s` seconds, plus every message."""

    def __init__(self, stream: TextIO | None = None, *, interval_s: float = 10.0) -> None:
        """Write to `stream` (stderr by default)."""
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self._task, self._total, self._unit = "", 0, "step"
        self._start_time = self._last_print = 0.0
        self._start_completed = 0

    def start(self, *, task: str, total: int, completed: int = 0, unit: str = "step") -> None:
        """Remember the phase; print its first line."""
        self._task, self._total, self._unit = task, total, unit
        self._start_time = self._last_print = time.monotonic()
        self._start_completed = completed
        self._write(f"{task}: {completed}/{total} {unit}s")

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        """Print a line when the interval has passed or the phase is complete."""
        now = time.monotonic()
        if now - self._last_print < self.interval_s and completed < self._total:
            return
        self._last_print = now
        done = completed - self._start_completed
        rate = done / max(now - self._start_time, 1e-9)
        eta = (self._total - completed) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k} {format_metric(v)}" for k, v in metrics.items())
        percent = 100.0 * completed / max(self._total, 1)
        self._write(
            f"{self._task}: {self._unit} {completed}/{self._total} ({percent:.0f}%) {shown} "
            f"eta {format_duration(eta)}".replace("  ", " ")
        )

    def message(self, text: str) -> None:
        """Print the message as its own line."""
        self._write(text)

    def stop(self) -> None:
        """Nothing to tear down for plain lines."""

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class NullReporter:
    """Reports nothing (tests, library use)."""

    def start(self, *, task: str, total: int, completed: int = 0, unit: str = "step") -> None:
        """Ignore."""

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        """Ignore."""

    def message(self, text: str) -> None:
        """Ignore."""

    def stop(self) -> None:
        """Ignore."""


def format_metric(value: float) -> str:
    """Counts as integers; other values with 4 significant digits, tiny or huge ones in e-form."""
    if isinstance(value, int):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"
