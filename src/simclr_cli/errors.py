"""Errors the engine raises for the user to act on.

Every message says what went wrong and what to do about it; the command line prints the
message alone (no traceback) and exits with status 1.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeviceError",
    "ImageDecodeError",
    "NonFiniteLossError",
    "SimclrError",
    "os_error_reason",
]


class SimclrError(Exception):
    """Base class for every error meant to reach the user as one line."""


class ConfigError(SimclrError):
    """An option or a combination of options that cannot work."""


class DataError(SimclrError):
    """The input folder is missing, empty or holds no readable image."""


class ImageDecodeError(SimclrError):
    """One image could not be decoded; callers usually skip it and count it."""

    def __init__(self, path: object, reason: str) -> None:
        """Record which file failed and why."""
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class DeviceError(SimclrError):
    """The requested device or precision is not available here."""


class CheckpointError(SimclrError):
    """A checkpoint or model folder is missing, damaged or does not match the run."""


class NonFiniteLossError(SimclrError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


def os_error_reason(error: OSError) -> str:
    """Why a file operation failed, in words a user can act on.

    `mkdir` reports a file standing where a folder must go as "File exists", and `open`
    as "Not a directory"; both read better as what they mean.
    """
    if isinstance(error, (FileExistsError, NotADirectoryError)):
        where = f" {error.filename}" if error.filename else ""
        return f"part of the path{where} is a file, not a folder"
    return error.strerror or str(error) or type(error).__name__


# How torch words a failed allocation on each device; CUDA's has its own exception type
# (torch.OutOfMemoryError), the others are plain RuntimeErrors.
_OUT_OF_MEMORY_TEXT = (
    ("CUDA out of memory", "the GPU"),
    ("MPS backend out of memory", "the Apple GPU"),
    ("DefaultCPUAllocator: can't allocate memory", "the CPU (RAM)"),
    ("DefaultCPUAllocator: not enough memory", "the CPU (RAM)"),
)


def out_of_memory_message(error: BaseException) -> str | None:
    """One actionable line for a failed allocation, or None when `error` is something else.

    torch's own text is several lines of allocator statistics; what the user can change is
    the batch (or the chunk the batch is computed in).
    """
    text = str(error)
    where = next((device for needle, device in _OUT_OF_MEMORY_TEXT if needle in text), None)
    if where is None and type(error).__name__ == "OutOfMemoryError":
        where = "the GPU"
    if where is None:
        return None
    from simclr_cli.allocator import freed_memory_kept

    malloc_hint = ""
    if where == "the CPU (RAM)" and freed_memory_kept():
        # Keeping freed memory for speed raises the peak by a third to a half (allocator.py).
        malloc_hint = ", or SIMCLR_MALLOC=default (a lower peak, slower steps)"
    return (
        f"out of memory on {where}; lower --batch-size, or for pretrain keep the batch and "
        "add --chunk-size 64 (gradient cache: the same step in less memory) or --precision "
        f"bf16{malloc_hint}. Checkpoints already written are intact"
    )


def output_location_problem(path: Path) -> str | None:
    """Why `path` (a file or folder to be written, maybe not there yet) cannot be written.

    Asks the operating system without creating anything: walks up to the nearest thing that
    exists, which must be a folder we may write into (access() also answers for read-only
    mounts). None when writing looks possible; a full disk is only found when writing.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        return f"{existing} is a file, not a folder"
    target = existing if existing.is_dir() else existing.parent
    if os.access(target, os.W_OK | os.X_OK):
        return None
    read_only = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    reason = "read-only file system" if read_only else "permission denied"
    return reason if target == path else f"{reason} ({target} is not writable)"


def format_bytes(size: float) -> str:
    """A size for messages: KiB below 1 MiB, MiB below 1 GiB, else GiB with one decimal."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:.0f} MiB"
    return f"{max(1, round(size / 2**10))} KiB"
