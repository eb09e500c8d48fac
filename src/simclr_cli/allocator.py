"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

A training step allocates and frees the same large activation tensors every time: at batch
256 (512 views) a ResNet-18 layer-1 activation is 134 MB at 32 px with the small stem.
glibc's malloc serves blocks above its mmap threshold (128 KiB, rising to 32 MiB at most as
blocks are freed) with a fresh `mmap` and unmaps them on `free`, so every step touches those
pages anew: 1.3-1.5 million minor page faults and 3-4 CPU-seconds in the kernel per step,
measured on a 2-core AMD EPYC (torch 2.14.1, fp32). With both thresholds raised, the memory
freed by one step is reused by the next: no page faults after the first step, and a model
step took 11.2 s instead of 12.7 s (32 px, small stem) and 7.0 s instead of 8.3 s (96 px);
on a 2-core Xeon with AMX, 2.23 s instead of 2.85 s in bf16 at 32 px and 5.88 s instead of
6.90 s in fp32 (benchmarks/README.md, "Keeping freed memory"). PyTorch's CPU tuning guide
reaches the same end by preloading jemalloc or tcmalloc; `mallopt` needs no extra library
and no re-exec.

The cost is memory. What a step frees stays counted in the process's resident size until the
process exits, so RSS reads as its peak rather than falling between steps; and the peak is
higher, since every block now comes from one heap where freed blocks of one size do not
always fit the next request of another, so the heap grows past the live peak. The model
step alone (benchmarks/malloc_step.py, AMX Xeon, batch 256, 32 px) peaked at 3,190-3,550
MiB instead of 2,290 in bf16 and 4,840-5,100 instead of 3,350-3,390 in fp32, 34-55% more
counting the 96 px step; whole short runs measured 14-19% more. Fixed mmap thresholds of
64 and 256 MiB were tried: the lower one kept most of the page faults, the higher one most
of the extra peak. Steps whose buffers stay under 32 MiB (small batches and images) gain
nothing, since glibc already reuses those from its heap. `SIMCLR_MALLOC=default` leaves
glibc's settings alone.

Nothing happens on macOS, Windows or a musl-based Linux; CUDA and MPS memory is managed by
their own caching allocators and is not affected.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["OPT_OUT_VARIABLE", "freed_memory_kept", "keep_freed_memory", "setting_problem"]

OPT_OUT_VARIABLE = "SIMCLR_MALLOC"
# "keep" (or unset) asks for the setting, "default" for glibc as shipped.
_VALUES = ("keep", "default")
# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest value mallopt's int argument holds: blocks up to 2 GiB come from the heap, and
# the top of the heap is returned to the kernel only when 2 GiB of it are free.
_LARGEST = 2**31 - 1
_kept = False  # set once keep_freed_memory has taken effect in this process


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True when both took effect.

    Call it once, early, from the process that owns the run (the `simclr` command does):
    it changes malloc for the whole process. Data-loader workers inherit it only when they
    are forked (Linux's default start method up to Python 3.13; 3.14 starts them from a
    fork server, which keeps glibc's defaults). They only decode images, so little is lost.
    """
    global _kept
    if _requested() == "default":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Trim first: if the mmap threshold were refused, the heap still keeps its top.
    trimmed: bool = mallopt(_M_TRIM_THRESHOLD, _LARGEST) == 1
    mapped: bool = mallopt(_M_MMAP_THRESHOLD, _LARGEST) == 1
    _kept = _kept or (trimmed and mapped)
    return trimmed and mapped


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` took effect in this process (for run logs)."""
    return _kept


def setting_problem() -> str | None:
    """One line about a `SIMCLR_MALLOC` value this module does not know, else None.

    An unknown value is treated as unset (freed memory is kept), not as an error: the
    variable changes speed and memory, never results.
    """
    if _requested() in ("", *_VALUES):
        return None
    raw = os.environ[OPT_OUT_VARIABLE]
    return (
        f"{OPT_OUT_VARIABLE}={raw!r} is not understood (use 'default' for glibc's settings, "
        "or 'keep'); freed memory is kept"
    )


def _requested() -> str:
    return os.environ.get(OPT_OUT_VARIABLE, "").strip().lower()
