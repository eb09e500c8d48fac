"""Named random streams derived from one seed.

Each consumer (model init, the data order of an epoch, the augmentations of a step) gets its
own seed computed from the run seed and its name, so a run resumed at any step replays
exactly the streams it would have used without the interruption.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator_for"]


def derive_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 62-bit seed that depends only on (seed, purpose, index)."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def generator_for(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator seeded for one named stream."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, index))
