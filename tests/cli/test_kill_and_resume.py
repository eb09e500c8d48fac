import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from simclr_cli.checkpoint import load_checkpoint


def _pretrain_args(data: Path, run: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "simclr_cli",
        "pretrain",
        str(data),
        "-o",
        str(run),
        "--epochs",
        "3",
        "--image-size",
        "16",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--checkpoint-minutes",
        "0.0001",
        "--flip-prob",
        "0",
        "--seed",
        "3",
    ]


def test_sigkill_mid_run_leaves_a_loadable_checkpoint_and_resume_finishes(
    few_digits: Path, tmp_path: Path
) -> None:
    # A run killed without warning resumes from its last complete checkpoint to the end.
    run = tmp_path / "run"
    process = subprocess.Popen(
        _pretrain_args(few_digits, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 1 <= state["step"] < 9
    assert not (run / "model.safetensors").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "pretrain", "--resume", str(run), "--workers", "0"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_numbers = [r["step"] for r in steps if r["kind"] == "step"]
    assert step_numbers == list(range(1, 10))  # 3 steps x 3 epochs, none twice, none missing
    assert (run / "model.safetensors").is_file()
    assert f"resumed at step {state['step']}" in resumed.stderr
