"""Two gloo processes on the CPU against one process on the concatenated global batch."""

from __future__ import annotations

import json
import math
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_workers import gradient_worker, pretrain_worker
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclr_cli.config import AugmentConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from simclr_cli.distributed import GlobalBatchNorm, convert_sync_batchnorm, share_bounds
from simclr_cli.engine.pretrain import pretrain, resume_config
from simclr_cli.errors import ConfigError
from simclr_cli.models.simclr import build_model


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned processes inherit this: gloo talks over the loopback interface only.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


@pytest.fixture(scope="module")
def gradient_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("grads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLOO_SOCKET_IFNAME", "lo")  # module scope: the autouse one comes later
        mp.spawn(gradient_worker, args=(2, str(out / "store"), str(out)), nprocs=2)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_processes_match_one_process_on_the_global_batch(gradient_results: list) -> None:
    # Gathered negatives, positives at each rank's offset and synced BN: same loss, same grads.
    for rank in gradient_results:
        assert rank["correct"]["loss_error"] < 1e-5
        assert rank["correct"]["grad_error"] < 1e-5  # float64 (see dist_workers): 3e-7 measured


@pytest.mark.parametrize(
    ("case", "broken"),
    [
        ("no_grad_gather", "grad_error"),  # same loss value, but gradients are lost
        ("misplaced_positives", "loss_error"),  # rank 1 pairs its views with rank 0's
        ("unsynced_bn", "grad_error"),  # per-process batch statistics
    ],
)
def test_the_comparison_catches_broken_variants(
    gradient_results: list, case: str, broken: str
) -> None:
    # Negative controls: each deliberate mistake moves the result well past the tolerance.
    worst = max(rank[case][broken] for rank in gradient_results)
    assert worst > 1e-2, (case, worst)


def test_chunks_across_processes_match_the_full_batch_with_frozen_encoder_bn(
    gradient_results: list,
) -> None:
    # Gradient caching in two processes is exact when encoder BN uses running statistics.
    for rank in gradient_results:
        assert rank["chunked_frozen_bn"]["loss_error"] < 1e-5
        assert rank["chunked_frozen_bn"]["grad_error"] < 1e-4


def test_no_plain_batchnorm_remains_when_synchronised() -> None:
    # Every BN layer of encoder and head becomes a synchronised one; keys stay loadable.
    model = build_model(ModelConfig(arch="resnet18"), image_size=16)
    plain_keys = set(model.state_dict())
    synced = convert_sync_batchnorm(model, torch.device("cpu"))
    norms = [m for m in synced.modules() if isinstance(m, _BatchNorm)]
    assert len(norms) == 21  # 20 in ResNet-18, 1 in the 2-layer head
    assert all(isinstance(m, GlobalBatchNorm) for m in norms)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in synced.modules())
    assert set(synced.state_dict()) == plain_keys


def test_shares_cover_the_batch_without_overlap() -> None:
    # Uneven batches give shares that differ by one image and cover every row once.
    for total, world in [(16, 2), (15, 4), (5, 5)]:
        bounds = [share_bounds(total, world, rank) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn_pretrain(config: RunConfig, *, resume: bool) -> None:
    mp.spawn(
        pretrain_worker,
        args=(2, _free_port(), json.dumps(config.to_dict()), resume),
        nprocs=2,
    )


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def _config(data: Path, out: Path, epochs: int) -> RunConfig:
    return RunConfig(
        augment=AugmentConfig(image_size=16, crop_area=(0.3, 1.0), flip_prob=0.0),
        optim=OptimConfig(warmup_epochs=1),
        train=TrainConfig(
            data_dir=str(data),
            out_dir=str(out),
            epochs=epochs,
            global_batch_size=16,
            num_workers=0,
        ),
    )


def test_checkpoints_move_between_one_and_two_processes(few_digits: Path, tmp_path: Path) -> None:
    # 1 process then 2, and 2 then 1, replay the same 6 steps: the run ignores the world size.
    one_then_two = tmp_path / "one_then_two"
    pretrain(_config(few_digits, one_then_two, epochs=1))
    _spawn_pretrain(resume_config(one_then_two, epochs=2), resume=True)

    two_then_one = tmp_path / "two_then_one"
    _spawn_pretrain(_config(few_digits, two_then_one, epochs=1), resume=False)
    start = json.loads((two_then_one / "metrics.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2 and start["sync_batchnorm"]
    pretrain(resume_config(two_then_one, epochs=2), resume=True)

    first, second = _losses(one_then_two), _losses(two_then_one)
    assert len(first) == len(second) == 6
    assert first == pytest.approx(second, rel=1e-4)
    config = json.loads((two_then_one / "run_config.json").read_text())
    assert config["train"]["sync_batchnorm"] is True
    assert (two_then_one / "model.safetensors").is_file()


def test_resume_refuses_to_change_batchnorm_handling(few_digits: Path, tmp_path: Path) -> None:
    # Turning sync BN off, or changing chunking, would change the run; the number of
    # processes and the backend would not.
    run = tmp_path / "run"
    pretrain(_config(few_digits, run, epochs=1))

    with pytest.raises(ConfigError, match="--sync-bn"):
        resume_config(run, sync_batchnorm=False)
    with pytest.raises(ConfigError, match="--chunk-size"):
        resume_config(run, chunk_size=4)
    assert resume_config(run, dist_backend="gloo").train.dist_backend == "gloo"


def test_a_share_left_with_one_streamed_image_is_passed_over_by_every_process(
    few_digits: Path, tmp_path: Path
) -> None:
    # Streamed, so unreadable files surface mid-epoch in one process only; before, that
    # process's batches fell out of step with the other's and the run crashed.
    data = tmp_path / "data"
    data.mkdir()
    for number, path in enumerate(sorted(few_digits.rglob("*.png"))[:10]):
        (data / f"digit{number}.png").write_bytes(path.read_bytes())
    for number in range(3):
        (data / f"broken{number}.png").write_bytes(b"")
    config = _config(data, tmp_path / "run", epochs=2)
    config = replace(config, train=replace(config.train, global_batch_size=6, cache_limit_gb=0.0))
    _spawn_pretrain(config, resume=False)
    steps = _losses(tmp_path / "run")
    assert 1 <= len(steps) < 4  # 2 batches of 6 per epoch; at least one passed over
    assert all(math.isfinite(loss) for loss in steps)
    assert (tmp_path / "run" / "model.safetensors").is_file()
