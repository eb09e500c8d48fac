"""Let idle OpenMP threads sleep, for commands that decode images beside the encoder.

`simclr embed`, `eval`, `predict` and the commands that embed a folder on the way
(`neighbors`, `duplicates`, `map`) decode images in a data-loader worker while the main
process runs the encoder on torch's OpenMP threads, one per core. Between parallel regions
GNU OpenMP (the runtime in torch's Linux wheels) keeps its idle threads spinning for a
while, and on a machine with as many threads as cores that spinning takes the core the
decoding worker needs. With `OMP_WAIT_POLICY=PASSIVE` idle threads sleep at once. Measured
on a 2-core Xeon with AMX (torch 2.14.1, 3,000 JPEG photo crops at 96 px, one worker;
benchmarks/README.md, "Idle threads"): the whole `simclr embed` command, interpreter start
included, ran 4% faster in fp32 and 11% in bf16; the embedding alone, 4-9% and 12-17%.

Training keeps the default: its data comes from memory, nothing else wants the cores, and
a model step measured about 1% slower with passive waiting. The runtime reads the variable
once, when torch is imported, so this must run before that; a value the user set is kept.
"""

from __future__ import annotations

import os
import sys

__all__ = ["WAIT_POLICY_VARIABLE", "let_idle_threads_sleep"]

WAIT_POLICY_VARIABLE = "OMP_WAIT_POLICY"


def let_idle_threads_sleep() -> bool:
    """Ask OpenMP for passive waiting in this process; True when the setting will apply.

    False when the user chose a policy (theirs stands) or torch is already imported (too
    late: the runtime has read its settings). Child processes inherit the variable; the
    data-loader workers run one thread each, so it changes nothing there.
    """
    if WAIT_POLICY_VARIABLE in os.environ or "torch" in sys.modules:
        return False
    os.environ[WAIT_POLICY_VARIABLE] = "PASSIVE"
    return True
