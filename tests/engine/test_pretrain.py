import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from simclr_cli.config import AugmentConfig, OptimConfig, RunConfig, TrainConfig
from simclr_cli.engine.pretrain import pretrain, resume_config
from simclr_cli.engine.progress import NullReporter
from simclr_cli.errors import CheckpointError, ConfigError, DataError
from simclr_cli.models.export import load_model


def tiny_config(data: Path, out: Path, **train: object) -> RunConfig:
    """16 px digits, batch 16: a few seconds per epoch on two CPU cores."""
    return RunConfig(
        augment=AugmentConfig(image_size=16, crop_area=(0.3, 1.0), flip_prob=0.0),
        optim=OptimConfig(warmup_epochs=1),
        train=TrainConfig(
            **{
                "data_dir": str(data),
                "out_dir": str(out),
                "epochs": 2,
                "global_batch_size": 16,
                "temperature": 0.5,
                "num_workers": 0,
                **train,
            }
        ),
    )


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


class InterruptAt(NullReporter):
    """Sends the process a real SIGINT once `step` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def advance(self, *, completed: int, metrics: dict[str, float]) -> None:
        if completed == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_pretrain_writes_a_complete_run_folder(few_digits: Path, tmp_path: Path) -> None:
    # A finished run leaves config, metrics, loss plot, checkpoint and an exported encoder.
    result = pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1))
    run = result.run_dir
    for name in (
        "run_config.json",
        "metrics.jsonl",
        "loss.png",
        "checkpoints/last.pt",
        "model.safetensors",
        "config.json",
        ".simclr-run",
    ):
        assert (run / name).is_file(), name
    assert result.num_images == 60 and result.step == 3  # full batches only; 12 wait
    model = load_model(run)
    assert model.image_size == 16 and model.backbone.small_stem
    assert json.loads((run / "config.json").read_text())["preprocessing"]["center_crop"] == 16


def test_interrupted_then_resumed_run_matches_an_uninterrupted_one(
    few_digits: Path, tmp_path: Path
) -> None:
    # Ctrl-C mid-epoch saves a checkpoint; resuming replays the same losses and learning rates.
    straight = pretrain(tiny_config(few_digits, tmp_path / "straight"))
    config = tiny_config(few_digits, tmp_path / "split")
    first = pretrain(config, reporter=InterruptAt(step=5))
    assert first.interrupted and first.step == 5
    assert not (first.run_dir / "model.safetensors").exists()
    resumed = pretrain(resume_config(first.run_dir), resume=True)
    assert resumed.step == straight.step and not resumed.interrupted
    expected, got = step_records(straight.run_dir), step_records(resumed.run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in expected], rel=1e-12)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-4)
    final_a = load_model(straight.run_dir).backbone.state_dict()
    final_b = load_model(resumed.run_dir).backbone.state_dict()
    assert all(torch.allclose(final_a[k].float(), final_b[k].float(), atol=1e-4) for k in final_a)


def test_loss_goes_down_over_a_short_run(digits_folder: Path, tmp_path: Path) -> None:
    # On real digits the mean NT-Xent loss of the last epoch is well below the first's.
    # Measured: 3.45 -> 2.87 with 2 threads, 3.45 -> 2.81 with 1 (float sums differ by thread
    # count, so 4 epochs' smaller drop was too close to the margin on one thread).
    config = tiny_config(digits_folder, tmp_path / "run", epochs=6)
    config = replace(
        config,
        optim=OptimConfig(optimizer="adamw", base_lr=1e-3, lr_scaling="none", warmup_epochs=1),
    )
    pretrain(config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    epochs = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "epoch"]
    assert len(epochs) == 6
    assert epochs[-1] < epochs[0] - 0.3


def test_resume_refuses_settings_that_would_change_the_run(
    few_digits: Path, tmp_path: Path
) -> None:
    # More epochs is fine; another temperature or architecture is refused with the reason.
    result = pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1))
    assert resume_config(result.run_dir, epochs=3).train.epochs == 3
    with pytest.raises(ConfigError, match="cannot change --temperature"):
        resume_config(result.run_dir, temperature=0.1)
    with pytest.raises(ConfigError, match="cannot change --arch"):
        resume_config(result.run_dir, changed={"arch": "resnet50"})
    tampered = replace(
        tiny_config(few_digits, result.run_dir, epochs=1), augment=AugmentConfig(image_size=24)
    )
    with pytest.raises(CheckpointError, match="different settings"):
        pretrain(tampered, resume=True)


def test_resume_with_more_epochs_continues_the_step_count(few_digits: Path, tmp_path: Path) -> None:
    # Extending a finished run trains only the new epochs, starting from the saved step.
    result = pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1))
    more = pretrain(resume_config(result.run_dir, epochs=2), resume=True)
    steps = [r["step"] for r in step_records(result.run_dir)]
    assert more.step == 6 and steps == list(range(1, 7))


def test_folders_without_two_readable_images_fail_before_training(tmp_path: Path) -> None:
    # Empty, all-junk and single-image folders are one-line errors; nothing is trained.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        pretrain(tiny_config(empty, tmp_path / "r1"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_text("not an image")
    (junk / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="could be read"):
        pretrain(tiny_config(junk, tmp_path / "r2"))
    single = tmp_path / "single"
    single.mkdir()
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(single / "one.png")
    with pytest.raises(DataError, match="at least two"):
        pretrain(tiny_config(single, tmp_path / "r3"))
    assert not (tmp_path / "r3" / "checkpoints").exists()


def test_a_new_run_never_overwrites_an_existing_one(few_digits: Path, tmp_path: Path) -> None:
    # Pointing a new run at a used folder is refused instead of clobbering it.
    pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1))


def test_bad_images_are_skipped_counted_and_named(few_digits: Path, tmp_path: Path) -> None:
    # A broken file among good ones is skipped once and reported; --strict stops instead.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(few_digits / "3", data / "3")
    shutil.copytree(few_digits / "7", data / "7")
    (data / "broken.png").write_bytes((few_digits / "3").iterdir().__next__().read_bytes()[:40])
    result = pretrain(tiny_config(data, tmp_path / "run", epochs=1))
    assert list(result.skipped) == [str(data / "broken.png")]
    assert result.num_images == 12
    with pytest.raises(DataError, match="broken.png"):
        pretrain(tiny_config(data, tmp_path / "strict", epochs=1, strict=True))


def test_output_folder_inside_the_input_is_not_scanned(few_digits: Path, tmp_path: Path) -> None:
    # The loss plot written into a run folder inside the data never becomes training data.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(few_digits / "1", data / "1")
    shutil.copytree(few_digits / "2", data / "2")
    first = pretrain(tiny_config(data, data / "runs" / "a", epochs=1))
    second = pretrain(tiny_config(data, data / "runs" / "b", epochs=1))
    assert first.num_images == second.num_images == 12


def test_resume_refuses_a_folder_whose_images_changed(few_digits: Path, tmp_path: Path) -> None:
    # Removing images changes every later batch; resume says so instead of drifting silently.
    import shutil

    data = tmp_path / "data"
    shutil.copytree(few_digits, data)
    result = pretrain(tiny_config(data, tmp_path / "run", epochs=1))
    next((data / "5").iterdir()).unlink()
    with pytest.raises(CheckpointError, match="changed since"):
        pretrain(resume_config(result.run_dir, epochs=2), resume=True)


def test_resume_with_fewer_epochs_than_done_is_refused(few_digits: Path, tmp_path: Path) -> None:
    # Asking a 2-epoch run to resume with 1 epoch cannot be honoured and says so.
    result = pretrain(tiny_config(few_digits, tmp_path / "run", epochs=2))
    with pytest.raises(ConfigError, match="already trained 2 epochs"):
        pretrain(resume_config(result.run_dir, epochs=1), resume=True)


def test_resume_accepts_repeating_the_runs_own_settings(few_digits: Path, tmp_path: Path) -> None:
    # Giving an option with the value the run already uses is not a change.
    result = pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1))
    config = resume_config(result.run_dir, temperature=0.5, changed={"image_size": 16})
    assert config.train.temperature == 0.5 and config.augment.image_size == 16


class Messages(NullReporter):
    """Keeps every line the engine reports."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_a_run_started_with_a_relative_folder_resumes_from_anywhere(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `-o runs/mine` (relative) used to be stored as given, so a resume from another working
    # directory was refused as "a run with different settings (train.out_dir)".
    (tmp_path / "started_here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "started_here")
    first = pretrain(tiny_config(few_digits, Path("runs/mine")), reporter=InterruptAt(step=2))
    assert first.interrupted
    run = tmp_path / "started_here" / "runs" / "mine"
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["train"]["out_dir"] == str(run)

    # A run written before out_dir was stored absolute resumes as well.
    from simclr_cli.checkpoint import load_checkpoint, save_training_checkpoint

    checkpoint = run / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)
    state["config"]["train"]["out_dir"] = "runs/mine"
    save_training_checkpoint(checkpoint, state)

    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = pretrain(resume_config(run), resume=True)
    assert not resumed.interrupted and resumed.step == 6
    assert not (tmp_path / "elsewhere" / "runs").exists()


def test_a_finished_run_stays_finished_after_its_epochs_were_changed(
    few_digits: Path, tmp_path: Path
) -> None:
    # Planned for 3 epochs, stopped, finished early with --epochs 1: a later plain --resume
    # used to train on to the original 3 and overwrite the exported model.
    run = tmp_path / "run"
    first = pretrain(tiny_config(few_digits, run, epochs=3), reporter=InterruptAt(step=2))
    assert first.interrupted
    finished = pretrain(resume_config(run, epochs=1), resume=True)
    assert finished.step == 3 and not finished.interrupted
    exported = (run / "model.safetensors").read_bytes()
    again = pretrain(resume_config(run), resume=True)
    assert again.step == 3
    assert (run / "model.safetensors").read_bytes() == exported
    assert json.loads((run / "run_config.json").read_text())["train"]["epochs"] == 1


def test_a_failed_init_leaves_no_run_folder(few_digits: Path, tmp_path: Path) -> None:
    # The run folder used to be made before --init was loaded, so the corrected command
    # was then refused with "already holds a run".
    from dataclasses import replace as replace_field

    run = tmp_path / "run"
    not_weights = next(few_digits.rglob("*.png"))
    config = tiny_config(few_digits, run, epochs=1)
    bad = replace_field(config, train=replace_field(config.train, init=str(not_weights)))
    with pytest.raises((CheckpointError, ConfigError)):
        pretrain(bad)
    assert not run.exists()
    assert pretrain(config).step == 3


def test_an_existing_run_is_refused_before_any_image_is_decoded(
    few_digits: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    pretrain(tiny_config(few_digits, run, epochs=1))
    reporter = Messages()
    with pytest.raises(ConfigError, match="already holds a run"):
        pretrain(tiny_config(few_digits, run, epochs=1), reporter=reporter)
    assert not any("decoding" in line for line in reporter.lines), reporter.lines


@pytest.mark.parametrize("kept", [True, False])
def test_the_run_says_whether_freed_memory_was_kept(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: bool
) -> None:
    # The malloc setting changes speed and peak memory, so the log and metrics name it.
    import simclr_cli.allocator

    monkeypatch.setattr(simclr_cli.allocator, "_kept", kept)
    reporter = Messages()
    result = pretrain(tiny_config(few_digits, tmp_path / "run", epochs=1), reporter=reporter)
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    start = next(r for r in map(json.loads, lines) if r["kind"] == "start")
    assert start["freed_memory_kept"] is kept
    banner = reporter.lines[0]
    assert banner.startswith("simclr ") and ("malloc keeps freed memory" in banner) is kept
