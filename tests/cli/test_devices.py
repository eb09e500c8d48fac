import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.mark.slow  # two processes of torch start-up and a launcher: about 35 s on 2 cores
def test_devices_2_trains_one_run_whose_model_embeds(few_digits: Path, tmp_path: Path) -> None:
    # `--devices 2` starts two gloo processes through torch's elastic launcher; rank 0
    # writes one run folder whose encoder then embeds images like any other.
    run = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "pretrain", str(few_digits), "-o", str(run),
         "--epochs", "1", "--image-size", "16", "--batch-size", "16", "--workers", "0",
         "--flip-prob", "0", "--device", "cpu", "--devices", "2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.count("epoch 1/1: mean loss") == 1  # progress from rank 0 only
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2 and records[0]["dist_backend"] == "gloo"
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3]

    vectors = tmp_path / "vecs.npy"
    embedded = subprocess.run(
        [sys.executable, "-m", "simclr_cli", "embed", str(few_digits), "--model", str(run),
         "-o", str(vectors), "--device", "cpu", "--workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert embedded.returncode == 0, embedded.stderr
    features = np.load(vectors)
    assert features.shape == (60, 512) and np.isfinite(features).all()


def test_devices_is_removed_from_the_workers_command_line() -> None:
    # Workers get the user's arguments minus --devices (both spellings), nothing else.
    from simclr_cli.cli.pretrain import _without_devices

    given = ["pretrain", "d", "--devices", "4", "-b", "8", "--devices=2", "--seed", "3"]
    assert _without_devices(given) == ["pretrain", "d", "-b", "8", "--seed", "3"]
