"""Inputs a newcomer tried that once gave a traceback or a silent loss."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from simclr_cli.config import AugmentConfig, RunConfig, TrainConfig
from simclr_cli.data.images import decode_image, scan_images
from simclr_cli.engine.finetune import resume_finetune_config
from simclr_cli.engine.pretrain import _warn_if_at_chance, pretrain, resume_config
from simclr_cli.engine.progress import NullReporter
from simclr_cli.errors import CheckpointError, ConfigError, ImageDecodeError


def test_a_link_to_itself_is_skipped_alone_not_its_folder(few_digits: Path, tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    shutil.copytree(few_digits, folder)
    os.symlink("loop.png", folder / "3" / "loop.png")  # ELOOP when followed
    os.symlink("gone.png", folder / "3" / "dangling.png")
    os.symlink("loopB", folder / "3" / "loopA")  # not image names: ignored without a word
    os.symlink("loopA", folder / "3" / "loopB")
    paths = scan_images(folder)
    assert len(paths) == 62  # both broken image links are listed, so they are counted
    reasons = {}
    for name in ("loop.png", "dangling.png"):
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(folder / "3" / name)
        reasons[name] = caught.value.reason
    assert "loops" in reasons["loop.png"] and "target is gone" in reasons["dangling.png"]


def test_damaged_run_configs_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "run_config.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="damaged or not a simclr run config"):
        resume_config(tmp_path)
    (tmp_path / "finetune_config.json").write_text('{"nonsense": 1}')
    with pytest.raises(CheckpointError, match="damaged or not a fine-tuning config"):
        resume_finetune_config(tmp_path)


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


def test_a_file_in_the_way_of_the_output_folder_is_named(few_digits: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    config = RunConfig(
        augment=AugmentConfig(image_size=16),
        train=TrainConfig(data_dir=str(few_digits), out_dir=str(tmp_path / "taken" / "run"),
                          epochs=1, global_batch_size=32, num_workers=0),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="taken.* is a file, not a folder"):
        pretrain(config)


def test_manifest_paths_are_normalised(few_digits: Path, tmp_path: Path) -> None:
    roundabout = tmp_path / "elsewhere" / ".." / few_digits.name
    (tmp_path / "elsewhere").mkdir()
    shutil.copytree(few_digits, tmp_path / few_digits.name)
    paths = scan_images(roundabout)
    assert paths and all(".." not in path.parts for path in paths)


class _Messages(NullReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_a_run_that_ends_at_chance_level_says_so(few_digits: Path, tmp_path: Path) -> None:
    # One step of LARS warm-up cannot move the loss off log(2B - 1); the user is told, with
    # settings that do learn in short runs.
    config = RunConfig(
        augment=AugmentConfig(image_size=16, flip_prob=0.0),
        train=TrainConfig(data_dir=str(few_digits), out_dir=str(tmp_path / "run"), epochs=1,
                          global_batch_size=32, num_workers=0),
    )  # fmt: skip
    reporter = _Messages()
    result = pretrain(config, reporter=reporter)
    chance = math.log(2 * 32 - 1)
    assert result.final_loss > 0.99 * chance
    assert any("at chance level" in line and "--optimizer adamw" in line for line in reporter.lines)
    # A loss clearly below chance (here, the demo's typical end) draws no warning.
    quiet = _Messages()
    _warn_if_at_chance(2.4, 128, quiet)
    assert quiet.lines == []
