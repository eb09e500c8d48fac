"""let_idle_threads_sleep: inference commands ask OpenMP for passive waiting before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from simclr_cli.threads import WAIT_POLICY_VARIABLE

# Reports what the call returned and the variable as torch sees it when it is first imported.
_UNIT_PROBE = """
import json, os, sys
from simclr_cli.threads import let_idle_threads_sleep
if sys.argv[1] == "torch-first":
    import torch
took = let_idle_threads_sleep()
print(json.dumps({"took": took, "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""

# Runs the command line in this interpreter and records the variable at the moment the first
# `import torch` starts, which is when torch's OpenMP runtime reads it.
_CLI_PROBE = """
import json, os, sys
seen = {}

class WatchTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "at_torch_import" not in seen:
            seen["at_torch_import"] = os.environ.get("OMP_WAIT_POLICY")
        return None

sys.meta_path.insert(0, WatchTorch())
from simclr_cli.cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as stop:
    seen["exit"] = stop.code
print(json.dumps(seen))
"""


def _run(code: str, *args: str, **env: str) -> dict[str, object]:
    run_env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY_VARIABLE}
    run_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sets_passive_waiting_before_torch_is_imported() -> None:
    assert _run(_UNIT_PROBE, "before") == {"took": True, "policy": "PASSIVE"}


def test_a_policy_the_user_set_is_kept() -> None:
    assert _run(_UNIT_PROBE, "before", OMP_WAIT_POLICY="ACTIVE") == {
        "took": False,
        "policy": "ACTIVE",
    }


def test_does_nothing_once_torch_is_loaded() -> None:
    # Too late to matter, so the environment is left as it was rather than claim an effect.
    assert _run(_UNIT_PROBE, "torch-first") == {"took": False, "policy": None}


def test_embed_command_sets_it_before_torch_loads(
    few_digits: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "vecs.npy"
    seen = _run(
        _CLI_PROBE, "embed", str(few_digits), "-o", str(out), "--model", str(encoder_dir), "-q"
    )
    assert seen == {"at_torch_import": "PASSIVE", "exit": 0}
    assert out.is_file()
