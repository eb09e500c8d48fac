"""Faults during training: a full disk at a save, a non-finite loss, kills at random moments."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from simclr_cli.checkpoint import load_checkpoint
from simclr_cli.config import AugmentConfig, OptimConfig, RunConfig, TrainConfig
from simclr_cli.engine.pretrain import pretrain
from simclr_cli.errors import CheckpointError, NonFiniteLossError
from simclr_cli.models.export import load_model


def tiny_config(data: Path, out: Path, epochs: int = 2) -> RunConfig:
    return RunConfig(
        augment=AugmentConfig(image_size=16, crop_area=(0.3, 1.0), flip_prob=0.0),
        optim=OptimConfig(warmup_epochs=1),
        train=TrainConfig(
            data_dir=str(data), out_dir=str(out), epochs=epochs, global_batch_size=16,
            num_workers=0, seed=3,
        ),
    )  # fmt: skip


def test_full_disk_at_a_save_keeps_the_previous_checkpoint_and_says_so(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(
        obj: object, target: object, *args: object, **kw: object
    ) -> None:
        calls.append(target)
        if len(calls) >= 2:
            # Part of the file gets written before the disk runs out, as in real life. The
            # target is the open file torch.save writes through (a path in older versions).
            if hasattr(target, "write"):
                target.write(b"partial")
            else:
                Path(str(target)).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, target, *args, **kw)

    monkeypatch.setattr("simclr_cli.checkpoint.torch.save", save_until_the_disk_is_full)
    with pytest.raises(
        CheckpointError, match="No space left on device.*previous checkpoint is intact"
    ):
        pretrain(tiny_config(few_digits, tmp_path / "run"))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["step"] == 3
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert leftovers == ["last.pt"]


def test_non_finite_loss_stops_with_advice_and_writes_no_nan_checkpoint(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simclr_cli import loss as loss_module

    real_loss, calls = loss_module.nt_xent_loss, []

    def loss_that_explodes_at_step_5(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        value = real_loss(*args, **kwargs)  # type: ignore[arg-type]
        return value * float("nan") if len(calls) == 5 else value

    monkeypatch.setattr("simclr_cli.engine.pretrain.nt_xent_loss", loss_that_explodes_at_step_5)
    with pytest.raises(NonFiniteLossError, match="lower learning rate"):
        pretrain(tiny_config(few_digits, tmp_path / "run"))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _args(data: Path, run: Path) -> list[str]:
    return [
        sys.executable, "-m", "simclr_cli", "pretrain", str(data), "-o", str(run),
        "--epochs", "3", "--image-size", "16", "--batch-size", "16", "--workers", "0",
        "--checkpoint-minutes", "0.0001", "--flip-prob", "0", "--seed", "3",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_killed_at_a_random_moment_then_resumed_equals_an_uninterrupted_run(
    few_digits: Path, tmp_path: Path, seed: int
) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_args(few_digits, straight), check=True, capture_output=True, timeout=600)
    run = tmp_path / "run"
    process = subprocess.Popen(
        _args(few_digits, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Anywhere from start-up (no checkpoint yet) to the last steps.
    time.sleep(random.Random(seed).uniform(2.0, 25.0))
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    if (run / "model.safetensors").exists():
        pytest.skip("the run finished before the kill on this machine")
    command = [
        sys.executable,
        "-m",
        "simclr_cli",
        "pretrain",
        "--resume",
        str(run),
        "--workers",
        "0",
    ]
    if not (run / "run_config.json").exists():
        command = _args(few_digits, run)  # killed before the run folder existed: start again
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    a = load_model(straight).backbone.state_dict()
    b = load_model(run).backbone.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["kind"] == "step"] == list(range(1, 10))
