"""Device and precision, resolved in one place.

`auto` prefers CUDA, then Apple MPS, then the CPU. Mixed precision runs through autocast,
and GradScaler only for fp16, the one format whose small range needs loss scaling.

On the CPU, `auto` is fp32 except for training on processors with native bf16 arithmetic
(AMX tiles, Intel Xeon since Sapphire Rapids; or AVX512-BF16, AMD since Zen 4 and Intel
Cooper Lake). There bf16 autocast ran the ResNet-18 training step at 32 px 2.2-2.8x faster
on a 2-core AMX Xeon and 1.9x faster on a 2-core Zen 4 EPYC (7.80 s against 4.10 s for 256
images, benchmarks/precision_step.py), and learned as well as fp32 within the spread between
seeds (benchmarks/README.md). Embedding and evaluation stay fp32: their similarities feed
thresholds (duplicates) that bf16 rounding would blur.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from simclr_cli.errors import DeviceError

__all__ = [
    "Precision",
    "autocast",
    "cpu_bf16_probes",
    "cpu_trains_faster_in_bf16",
    "resolve_device",
    "resolve_precision",
]

logger = logging.getLogger(__name__)

# torch.cpu's private probes for native bf16 arithmetic.
_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|cuda:N|mps` into an available torch device."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no CUDA GPU is visible; use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise DeviceError(f"{name} requested but only {count} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError("MPS was requested but is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_trains_faster_in_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), so `auto` trains in bf16.

    Both kinds were measured to pay off (the module docstring). Where torch lacks the probes the
    answer is unknown and `auto` stays with fp32. `SIMCLR_CPU_BF16=0` (or `1`) overrides
    the detection.
    """
    forced = os.environ.get("SIMCLR_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return any(answer is True for answer in cpu_bf16_probes().values())


def cpu_bf16_probes() -> dict[str, bool | None]:
    """What torch says about native bf16 arithmetic: avx512_bf16, amx_tile; None if unknown."""
    return {name.removeprefix("_is_").removesuffix("_supported"): _cpu_probe(name)
            for name in _BF16_PROBES}  # fmt: skip


def _cpu_probe(name: str) -> bool | None:
    """A private `torch.cpu` feature probe (torch 2.x); None where this torch has none."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else None
    except Exception:  # an older or newer torch whose probe fails
        return None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Precision:
    """The compute dtype of a run and whether it needs loss scaling."""

    name: str
    dtype: torch.dtype

    @property
    def needs_grad_scaler(self) -> bool:
        """Only fp16 underflows without loss scaling."""
        return self.dtype == torch.float16


def resolve_precision(name: str, device: torch.device, *, training: bool = False) -> Precision:
    """Pick fp32/bf16/fp16 for `name`, resolving `auto` for this device.

    `auto` is bf16 (or fp16) on CUDA, fp32 on MPS, and on the CPU bf16 for training where
    the processor has native bf16 arithmetic, fp32 otherwise.
    """
    name = name.strip().lower()
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu" and training and cpu_trains_faster_in_bf16():
            name = "bf16"
        else:
            name = "fp32"
    if name not in _DTYPES:
        raise DeviceError(f"unknown precision {name!r}; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise DeviceError("fp16 is not supported on the CPU; use --precision bf16 or fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_bf16_instructions():
        logger.warning(
            "this CPU has no native bf16 instructions (AVX512-BF16 or AMX), so bf16 is "
            "emulated: on a 2-core AVX2 EPYC a ResNet-18 training step ran 17x slower in bf16 "
            "than in fp32. --precision fp32 (or auto) will be much faster here"
        )
    return Precision(name=name, dtype=_DTYPES[name])


def cpu_has_bf16_instructions() -> bool:
    """True where the CPU computes in bf16 natively (AVX512-BF16 or AMX); False: emulated.

    Elsewhere bf16 is converted to and from fp32 around fp32 arithmetic: 17x slower than
    fp32 for a training step on an AVX2 CPU (measured); on AVX512 without BF16 it is also
    emulated (not measured). If torch lacks the (private) probes, assume native, not warn.
    """
    answers = list(cpu_bf16_probes().values())
    return None in answers or any(answers)


@contextlib.contextmanager
def autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Autocast to the run's dtype; a no-op for fp32."""
    if precision.dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=precision.dtype):
        yield
