"""Inputs a newcomer tried that once gave a traceback or a silent loss."""

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from simclr_cli.checkpoint import load_checkpoint
from simclr_cli.config import AugmentConfig, RunConfig, TrainConfig
from simclr_cli.data.images import scan_images
from simclr_cli.engine.finetune import resume_finetune_config
from simclr_cli.engine.pretrain import pretrain, resume_config
from simclr_cli.errors import CheckpointError


def test_a_link_to_itself_is_skipped_alone_not_its_folder(few_digits: Path, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    shutil.copytree(few_digits, folder)
    os.symlink("loop.png", folder / "3" / "loop.png")  # ELOOP when followed
    os.symlink("gone.png", folder / "3" / "dangling.png")
    assert len(scan_images(folder)) == 60


def test_damaged_run_configs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "run_config.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="damaged or not a simclr run config"):
        resume_config(tmp_path)
    (tmp_path / "finetune_config.json").write_text('{"nonsense": 1}')
    with pytest.raises(CheckpointError, match="damaged or not a fine-tuning config"):
        resume_finetune_config(tmp_path)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this must never run",))


def test_a_pickled_checkpoint_is_refused_without_advice_to_unpickle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "last.pt"
    torch.save(
        {"format_version": 1, "evil": _Payload()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning is noise here
        with pytest.raises(CheckpointError, match="would run code") as caught:
            load_checkpoint(path)
    assert "weights_only" not in str(caught.value)
    assert "this must never run" not in capsys.readouterr().out


def test_a_batch_larger_than_the_folder_shrinks_and_is_recorded(
    few_digits: Path, tmp_path: Path
) -> None:
    config = RunConfig(
        augment=AugmentConfig(image_size=16, flip_prob=0.0),
        train=TrainConfig(data_dir=str(few_digits), out_dir=str(tmp_path / "run"), epochs=1,
                          global_batch_size=500, num_workers=0),
    )  # fmt: skip
    result = pretrain(config)
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["train"]["global_batch_size"] == 60 and result.step == 1
