"""Ctrl-C and SIGTERM as a request to checkpoint and stop, for every training loop."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["Interruptible", "interrupt_on_signal", "stop_on_signal"]


class Interruptible(Protocol):
    """A loop state with flags the loop checks after each step."""

    interrupted: bool


@contextmanager
def stop_on_signal(loop: Interruptible, *, agree: bool = False) -> Iterator[None]:
    """Ctrl-C or SIGTERM sets `loop.interrupted`; a second Ctrl-C aborts at once.

    With several processes (`agree`), a signal only sets `loop.stop_requested`: the loop's
    next reduction stops every process after the same step. Repeated signals do not abort
    then, because torchrun forwards the terminal's Ctrl-C, which each worker also receives
    directly.
    """

    def request_stop(signum: int, frame: object) -> None:
        if agree:
            loop.stop_requested = True  # type: ignore[attr-defined]
            return
        if loop.interrupted:
            raise KeyboardInterrupt
        loop.interrupted = True

    try:
        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def interrupt_on_signal() -> Iterator[None]:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt, for commands that keep partial work.

    Loops without steps to finish (embedding) stop where they are and save progress in their
    KeyboardInterrupt handling; a scheduler's `kill` then costs no more than Ctrl-C. Started in
    the background by a shell, a process ignores Ctrl-C; training still stops on it, so this
    does too.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, interrupt),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
        }
    except ValueError:  # not the main thread (called from Python): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
