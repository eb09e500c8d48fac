"""A real full disk: a small tmpfs mounted for the test (skipped where mounting is not allowed).

test_audit.py covers the same failures everywhere with a file-size limit (EFBIG); here the
filesystem itself runs out of blocks (ENOSPC), which is what a user's full disk does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_digits
from simclr_cli.checkpoint import load_checkpoint, save_training_checkpoint
from simclr_cli.engine.embed import EmbedOptions, _reserve_disk_space, embed_folder
from simclr_cli.errors import CheckpointError, ConfigError

DISK_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs, unmounted and removed afterwards."""
    mount_point = Path(tempfile.mkdtemp(prefix="simclr-small-disk-"))
    if shutil.which("mount") is None:
        mount_point.rmdir()
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip("mounting a tmpfs is not allowed here (needs root with CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)
        mount_point.rmdir()


def _fill(disk: Path, leave_bytes: int) -> None:
    """Write filler until at most `leave_bytes` are free."""
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(small_disk: Path) -> None:
    path = small_disk / "run" / "checkpoints" / "last.pt"
    save_training_checkpoint(path, {"step": 1, "weights": torch.ones(1000)})
    _fill(small_disk, leave_bytes=64 * 1024)
    with pytest.raises(
        CheckpointError, match="No space left on device.*previous checkpoint is intact"
    ):
        save_training_checkpoint(path, {"step": 2, "weights": torch.ones(100_000)})  # 400 KB
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left


@pytest.mark.parametrize("reserve", ["posix_fallocate", "zero-fill"])
def test_embed_onto_a_disk_too_small_for_its_rows_stops_before_any_work(
    small_disk: Path,
    encoder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reserve: str,
) -> None:
    # zero-fill: how the blocks are reserved where posix_fallocate is missing (macOS, Windows).
    if reserve == "zero-fill":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    data = write_digits(tmp_path / "data", per_class=10, labelled=False)  # 100 real digits
    _fill(small_disk, leave_bytes=100 * 1024)  # fewer bytes than 100 rows x 512 x 4
    out = small_disk / "vecs.npy"
    with pytest.raises(ConfigError, match=f"cannot write {out}: No space left on device"):
        embed_folder(data, encoder_dir, out, options=EmbedOptions(device="cpu", num_workers=0))
    leftovers = sorted(p.name for p in small_disk.iterdir())
    assert leftovers == ["filler"]


def test_without_posix_fallocate_the_array_file_is_zero_filled_not_sparse(
    encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where posix_fallocate is missing (macOS, Windows) the blocks are reserved by writing
    # zeros; the header stays intact and embed's rows are the same as with posix_fallocate.
    data = write_digits(tmp_path / "data", per_class=2, labelled=False)
    (data / "broken.png").write_bytes(b"")  # one skip: the exact-size copy is reserved too
    options = EmbedOptions(device="cpu", num_workers=0)
    embed_folder(data, encoder_dir, tmp_path / "a.npy", options=options)
    monkeypatch.delattr(os, "posix_fallocate", raising=False)
    embed_folder(data, encoder_dir, tmp_path / "b.npy", options=options)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))

    sparse = tmp_path / "sparse.npy"
    array = np.lib.format.open_memmap(sparse, mode="w+", dtype=np.float32, shape=(4096, 512))
    if sparse.stat().st_blocks * 512 >= sparse.stat().st_size:
        pytest.skip("this filesystem does not make sparse files")
    _reserve_disk_space(sparse, zero_fill_from=array.offset)
    del array
    assert sparse.stat().st_blocks * 512 >= sparse.stat().st_size  # every byte has its block
    assert np.load(sparse).shape == (4096, 512)


def test_a_disk_too_small_for_the_checkpoints_stops_pretrain_before_the_first_step(
    small_disk: Path, tmp_path: Path
) -> None:
    # A ResNet-18 checkpoint is about 90 MB; the 4 MiB disk is refused up front, instead of
    # after a whole epoch at the first save, and no run folder is left on it.
    from simclr_cli.config import AugmentConfig, RunConfig, TrainConfig
    from simclr_cli.engine.pretrain import pretrain

    data = write_digits(tmp_path / "data", per_class=2, labelled=False)
    config = RunConfig(
        augment=AugmentConfig(image_size=16),
        train=TrainConfig(
            data_dir=str(data), out_dir=str(small_disk / "run"), epochs=1, num_workers=0
        ),
    )
    with pytest.raises(ConfigError, match="free; this run's checkpoints need about .* MiB"):
        pretrain(config)
    assert not (small_disk / "run").exists()


def test_a_first_checkpoint_that_does_not_fit_does_not_claim_an_earlier_one(
    small_disk: Path,
) -> None:
    path = small_disk / "run" / "checkpoints" / "last.pt"
    _fill(small_disk, leave_bytes=64 * 1024)
    with pytest.raises(CheckpointError, match="no checkpoint was saved yet") as caught:
        save_training_checkpoint(path, {"step": 1, "weights": torch.ones(100_000)})
    assert "intact" not in str(caught.value)


def test_embed_with_room_for_the_rows_but_not_the_manifest_publishes_nothing(
    small_disk: Path, encoder_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rows fit; the disk fills (another program, say) while the manifest is written.
    # Before, vecs.npy was already in place beside an empty manifest and no vecs.json.
    from simclr_cli.engine import embed as embed_module

    data = write_digits(tmp_path / "data", per_class=2, labelled=False)
    out = small_disk / "vecs.npy"
    real_write_manifest = embed_module._write_manifest

    def disk_fills_first(*args: object, **kwargs: object) -> None:
        _fill(small_disk, leave_bytes=0)
        real_write_manifest(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(embed_module, "_write_manifest", disk_fills_first)
    with pytest.raises(ConfigError, match="could not write the manifest.*nothing was replaced"):
        embed_folder(data, encoder_dir, out, options=EmbedOptions(device="cpu", num_workers=0))
    visible = sorted(p.name for p in small_disk.iterdir() if not p.name.startswith("."))
    assert visible == ["filler"]
