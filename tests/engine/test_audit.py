"""Gaps found by auditing every command against the robustness issue, one test per gap.

Disk-full cases use a real file-size limit (RLIMIT_FSIZE), so writes fail inside the
libraries exactly as they do on a full disk, not through a mock that raises the error we
hope for.
"""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from simclr_cli.checkpoint import load_checkpoint, save_exported_model, save_training_checkpoint
from simclr_cli.config import AugmentConfig, OptimConfig, RunConfig, TrainConfig
from simclr_cli.engine.metrics import MetricsLog
from simclr_cli.errors import CheckpointError, DataError, ImageDecodeError


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """Writes beyond `limit_bytes` in one file fail with EFBIG, as they would on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_real_failed_checkpoint_write_keeps_the_previous_one_and_says_why(
    tmp_path: Path,
) -> None:
    # torch.save given a path reports a failed write as a bare RuntimeError ("unexpected pos").
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_training_checkpoint(path, {"step": 1, "weights": torch.ones(10)})
    with (
        file_size_limit(64 * 1024),
        pytest.raises(CheckpointError, match="File too large.*previous checkpoint is intact"),
    ):
        save_training_checkpoint(path, {"step": 2, "weights": torch.ones(1_000_000)})
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_real_failed_safetensors_write_is_an_os_error(tmp_path: Path) -> None:
    # safetensors reports it as a SafetensorError, which no caller handled.
    with file_size_limit(64 * 1024), pytest.raises(OSError, match="File too large"):
        save_exported_model(tmp_path, {"w": torch.ones(1_000_000)}, {"arch": "resnet18"})
    assert list(tmp_path.iterdir()) == []


def test_metrics_log_that_cannot_grow_is_a_one_line_error(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"kind": "step", "step": 1, "note": "x" * 2000})
    with file_size_limit(1024), pytest.raises(CheckpointError, match="File too large.*--resume"):
        log.append({"kind": "step", "step": 2})


def test_pretrain_that_cannot_write_its_final_model_says_how_to_recover(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simclr_cli.engine import pretrain as pretrain_module

    real_plot = pretrain_module.plot_loss_curve
    limits = contextlib.ExitStack()

    def plot_then_fill_the_disk(*args: object, **kwargs: object) -> None:
        real_plot(*args, **kwargs)  # type: ignore[arg-type]
        limits.enter_context(file_size_limit(256 * 1024))  # the export comes next

    monkeypatch.setattr(pretrain_module, "plot_loss_curve", plot_then_fill_the_disk)
    run = tmp_path / "run"
    config = RunConfig(
        augment=AugmentConfig(image_size=16),
        optim=OptimConfig(warmup_epochs=0),
        train=TrainConfig(
            data_dir=str(few_digits), out_dir=str(run), epochs=1, global_batch_size=16,
            num_workers=0, seed=3,
        ),
    )  # fmt: skip
    with limits, pytest.raises(CheckpointError, match=r"final model.*File too large.*--resume"):
        pretrain_module.pretrain(config)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (run / "model.safetensors").exists()


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels: tells whether opening was allowed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_augment_preview_max_pixels_admits_images_above_pillows_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from simclr_cli.engine.preview import preview_views

    # Restored after the test: lifting the limit is process-wide by design.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    path = tmp_path / "scan.png"
    path.write_bytes(_header_only_png(20_000, 20_000))  # 400 MP, past Pillow's refusal
    with pytest.raises(ImageDecodeError) as refused:
        preview_views(path, AugmentConfig(image_size=16), pairs=1, seed=0)
    assert "limit of" in refused.value.reason and "--max-pixels" in refused.value.reason
    # With --max-pixels the file is opened; only its missing pixels stop it now.
    with pytest.raises(ImageDecodeError) as opened:
        preview_views(path, AugmentConfig(image_size=16), pairs=1, seed=0, max_pixels=500_000_000)
    assert "truncated or corrupt" in opened.value.reason


def test_neighbors_never_takes_its_own_sheets_in_the_query_folder_as_queries(
    photo_index: Path, photos_with_copies: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from simclr_cli.cli.app import app

    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("coffee.png", "astronaut.png"):
        shutil.copy(photos_with_copies / name, queries / name)
    command = ["neighbors", str(queries), "--index", str(photo_index), "-k", "2"]
    command += ["-o", str(queries / "sheets"), "--device", "cpu"]
    for _ in range(2):  # the second run finds the first run's sheets inside the folder
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, result.output
        headers = [line for line in result.stdout.splitlines() if "; sheet:" in line]
        assert len(headers) == 2, result.stdout
    assert sorted(p.name for p in (queries / "sheets").iterdir()) == [
        "astronaut.png",
        "coffee.png",
    ]


@pytest.mark.parametrize(
    "planted", ["{root}/../../../etc/passwd", "/etc/passwd", "etc/passwd", "{root}/../x.png"]
)
def test_a_manifest_naming_files_outside_the_embedded_folder_is_refused(
    photo_index: Path, tmp_path: Path, planted: str
) -> None:
    from simclr_cli.engine.embeddings import load_embeddings

    index = tmp_path / "vecs.npy"
    for suffix in (".npy", ".json", ".manifest.csv"):
        shutil.copy(photo_index.with_suffix(suffix), index.with_suffix(suffix))
    load_embeddings(index)  # the copy as embed wrote it loads
    root = json.loads(index.with_suffix(".json").read_text())["data_dir"]
    lines = index.with_suffix(".manifest.csv").read_text().splitlines()
    row, path, reason = lines[1].split(",")
    lines[1] = ",".join([row, planted.format(root=root), reason])
    index.with_suffix(".manifest.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="manifest.*(outside|not an absolute path inside)"):
        load_embeddings(index)


def test_litter_and_run_folders_are_not_reported_as_empty_classes(
    few_digits: Path, tmp_path: Path
) -> None:
    from simclr_cli.data.images import RUN_MARKER
    from simclr_cli.data.labeled import scan_labeled

    root = tmp_path / "train"
    shutil.copytree(few_digits, root)
    (root / "__MACOSX" / "3").mkdir(parents=True)
    (root / "finetune-run").mkdir()  # `simclr finetune train -o train/finetune-run`
    (root / "finetune-run" / RUN_MARKER).write_text("run folder\n")
    shutil.copy(next((root / "3").iterdir()), root / "finetune-run" / "loss.png")
    (root / "cats").mkdir()  # a real empty class
    found = scan_labeled(root)
    assert found.empty_classes == ["cats"]
    assert found.class_names == [str(digit) for digit in range(10)]


def test_an_image_above_pillows_limit_is_told_to_use_max_pixels(tmp_path: Path) -> None:
    # Pillow refuses 400 MP at open; every command lifts that with --max-pixels, so the
    # message must not say the option cannot help.
    from simclr_cli.data.images import decode_image

    path = tmp_path / "scan.png"
    path.write_bytes(_header_only_png(20_000, 20_000))
    with pytest.raises(ImageDecodeError) as refused:
        decode_image(path)
    assert refused.value.reason == (
        "image of 400000000 pixels exceeds the limit of 178956970; raise it with --max-pixels"
    )


def test_malformed_exif_is_logged_with_its_file_not_warned_anonymously(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import warnings

    import numpy as np
    from PIL import Image

    from simclr_cli.data.images import decode_image

    digit = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
    path = tmp_path / "damaged exif.jpg"
    digit.convert("RGB").save(path, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff junk")
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        assert decode_image(path).size == (16, 16)
    assert not shown  # Pillow's "Corrupt EXIF data" named no file on stderr
    assert any(str(path) in r.message and "EXIF" in r.message for r in caplog.records)


def _digits_with_junk(few_digits: Path, root: Path) -> Path:
    """few_digits plus an empty file and a truncated PNG in class 3, and an empty class."""
    shutil.copytree(few_digits, root)
    (root / "3" / "empty.png").write_bytes(b"")
    real = next((root / "3").glob("0*.png")).read_bytes()
    (root / "3" / "cut.png").write_bytes(real[: len(real) // 2])
    (root / "cats").mkdir()
    return root


def test_eval_counts_skipped_files_and_reports_readable_images_per_class(
    encoder_dir: Path, few_digits: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from simclr_cli.cli.app import app

    train = _digits_with_junk(few_digits, tmp_path / "train")
    out = tmp_path / "eval"
    command = ["eval", str(train), "--test", str(digits_test_folder), "-m", str(encoder_dir)]
    result = CliRunner().invoke(app, [*command, "-k", "5", "-o", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "skipped 2 unreadable file(s)" in result.stdout
    data = json.loads((out / "eval.json").read_text())["data"]
    assert data["train_images"] == 60 and data["train_per_class"]["3"] == 6
    assert sorted(Path(p).name for p in data["skipped"]) == ["cut.png", "empty.png"]


def test_eval_warns_of_a_class_whose_every_file_is_unreadable(
    encoder_dir: Path, few_digits: Path, digits_test_folder: Path, tmp_path: Path
) -> None:
    # Class 4's folder holds files, none of them an image: not an "empty class folder", but
    # no less empty for the classifier, and the user is told so by name.
    from typer.testing import CliRunner

    from simclr_cli.cli.app import app

    train = tmp_path / "train"
    shutil.copytree(few_digits, train)
    for number, path in enumerate(sorted((train / "4").iterdir())):
        path.write_bytes(b"" if number % 2 else b"not an image")
    out = tmp_path / "eval"
    command = ["eval", str(train), "--test", str(digits_test_folder), "-m", str(encoder_dir)]
    result = CliRunner().invoke(app, [*command, "-k", "5", "-o", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "whose every image" in line]
    assert len(lines) == 1 and "in the training split: 4 (" in lines[0]
    data = json.loads((out / "eval.json").read_text())
    assert data["data"]["train_per_class"]["4"] == 0
    assert any("whose every image" in warning for warning in data["data"]["warnings"])


def test_finetune_warns_of_empty_classes_and_counts_skips_of_both_splits(
    encoder_dir: Path, few_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from simclr_cli.engine.finetune import FinetuneConfig, finetune

    train = _digits_with_junk(few_digits, tmp_path / "train")
    test = tmp_path / "test"
    shutil.copytree(few_digits / "5", test / "5")
    (test / "5" / "notes.jpg").write_text("not an image\n")
    config = FinetuneConfig(
        train_dir=str(train), test_dir=str(test), model=str(encoder_dir),
        out_dir=str(tmp_path / "run"), label_fraction=1.0, epochs=1, batch_size=32,
        num_workers=0,
    )  # fmt: skip
    result = finetune(config)
    assert sorted(Path(p).name for p in result.skipped) == ["cut.png", "empty.png", "notes.jpg"]
    assert any("empty class folder" in r.message and "cats" in r.message for r in caplog.records)


def test_a_decoding_worker_killed_during_a_step_is_one_actionable_line(
    few_digits: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import time

    import typer

    from simclr_cli.cli._common import user_errors
    from simclr_cli.data import loader
    from simclr_cli.data.loader import ImageBatches, SkipLog

    paths = sorted(few_digits.rglob("*.png"))[:12]
    real_load = loader.load_canvas

    def load_or_be_killed(path: Path, size: int, **kwargs: object) -> object:
        if path == paths[8]:  # the OOM killer, say, while the main process trains
            os.kill(os.getpid(), signal.SIGKILL)
        return real_load(path, size, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loader, "load_canvas", load_or_be_killed)
    data = ImageBatches(paths, canvas_size=16, num_workers=1, skip_log=SkipLog())
    started = time.monotonic()
    with pytest.raises(typer.Exit) as stopped, user_errors():
        for _batch in data.iterate(range(len(paths)), batch_size=2):
            time.sleep(0.4)  # a training step: torch's SIGCHLD handler raises in here
    assert stopped.value.exit_code == 1
    assert time.monotonic() - started < 30  # no hang
    err = capsys.readouterr().err
    assert "an image-decoding worker failed" in err and "--workers 0" in err
    assert "Traceback" not in err


def test_ycck_jpeg_keeps_its_colours(tmp_path: Path) -> None:
    # Pillow writes no YCCK, so the file is built as libjpeg decodes one: Adobe transform 2,
    # channels Y, Cb, Cr of the ink and inverted K (Photoshop's convention).
    import io

    import numpy as np
    from PIL import Image
    from skimage import data

    from simclr_cli.data.images import decode_image

    photo = Image.fromarray(data.chelsea()).resize((64, 48))
    ink = np.asarray(photo.convert("CMYK")).astype(np.float64)  # (H, W, 4)
    c, m, y = ink[..., 0], ink[..., 1], ink[..., 2]
    luma = 0.299 * c + 0.587 * m + 0.114 * y
    blue = -0.168736 * c - 0.331264 * m + 0.5 * y + 128
    red = 0.5 * c - 0.418688 * m - 0.081312 * y + 128
    stored = np.stack([luma, blue, red, 255 - ink[..., 3]], axis=-1)
    # Pillow stores CMYK JPEG samples inverted, so hand it the inverse of what must be stored.
    samples = np.clip(np.rint(255 - stored), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(samples, "CMYK").save(buffer, "JPEG", quality=98)
    jpeg = bytearray(buffer.getvalue())
    adobe = jpeg.index(b"\xff\xee")  # APP14
    assert jpeg[adobe + 4 : adobe + 9] == b"Adobe"
    jpeg[adobe + 15] = 2  # transform: YCCK
    path = tmp_path / "ycck.jpg"
    path.write_bytes(bytes(jpeg))
    assert Image.open(path).info["adobe_transform"] == 2
    decoded = np.asarray(decode_image(path)).astype(int)
    source = np.asarray(photo).astype(int)
    assert np.abs(decoded - source).mean() < 3  # inverted colours would be ~70 off


def test_an_unexpected_crash_shows_no_locals_so_no_token(tmp_path: Path) -> None:
    # Typer's pretty tracebacks would print every frame's locals, an HF_TOKEN included.
    import os
    import subprocess
    import sys

    token = "hf_AUDITsecret0123456789abcdef"
    (tmp_path / "crashing.py").write_text(
        "import os\n\n"
        "def embed_folder(*args, **kwargs):\n"
        "    secret = os.environ['HF_TOKEN']\n"
        "    raise ValueError('unexpected failure')\n"
    )
    script = (
        "import sys, crashing, simclr_cli.engine.embed as embed\n"
        "embed.embed_folder = crashing.embed_folder\n"
        "from simclr_cli.cli.app import main\n"
        "sys.argv = ['simclr', 'embed', sys.argv[1], '--model', sys.argv[1], '-o', sys.argv[2]]\n"
        "main()\n"
    )
    env = {**os.environ, "HF_TOKEN": token, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    env.pop("_TYPER_STANDARD_TRACEBACK", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(tmp_path / "v.npy")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "unexpected failure" in done.stderr
    assert "crashing.py" in done.stderr  # the traceback is shown, only without locals
    assert token not in done.stdout + done.stderr


def test_eval_output_inside_the_labelled_folder_never_becomes_a_class(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from simclr_cli.cli.app import app

    train = tmp_path / "train"
    shutil.copytree(few_digits, train)
    command = ["eval", str(train), "-m", str(encoder_dir), "-k", "5", "--workers", "0"]
    for _ in range(2):  # the second run finds the first one's confusion.png in train/results
        result = CliRunner().invoke(app, [*command, "-o", str(train / "results")])
        assert result.exit_code == 0, result.output
        data = json.loads((train / "results" / "eval.json").read_text())["data"]
        assert data["classes"] == [str(digit) for digit in range(10)]
        assert not data["warnings"]


def _streamed_folder(few_digits: Path, root: Path, *, good: int, junk: int) -> Path:
    root.mkdir()
    for number, path in enumerate(sorted(few_digits.rglob("*.png"))[:good]):
        shutil.copy(path, root / f"digit{number}.png")
    for number in range(junk):
        (root / f"junk{number:02d}.png").write_text("not an image\n")
    return root


def _streaming_config(data: Path, out: Path) -> RunConfig:
    return RunConfig(
        augment=AugmentConfig(image_size=16),
        optim=OptimConfig(warmup_epochs=0),
        train=TrainConfig(
            data_dir=str(data), out_dir=str(out), epochs=1, global_batch_size=16,
            num_workers=0, seed=3, cache_limit_gb=0.0,  # stream: bad files show up mid-epoch
        ),
    )  # fmt: skip


def test_a_streamed_batch_left_with_one_image_is_passed_over(
    few_digits: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from simclr_cli.engine.pretrain import pretrain

    data = _streamed_folder(few_digits, tmp_path / "data", good=3, junk=29)
    result = pretrain(_streaming_config(data, tmp_path / "run"))
    assert result.step >= 1 and len(result.skipped) == 29
    assert any("passing over a batch" in r.message for r in caplog.records)


def test_a_streamed_folder_with_one_readable_image_is_a_clear_error(
    few_digits: Path, tmp_path: Path
) -> None:
    from simclr_cli.engine.pretrain import pretrain

    data = _streamed_folder(few_digits, tmp_path / "data", good=1, junk=31)
    with pytest.raises(DataError, match="no batch of an epoch held two readable images"):
        pretrain(_streaming_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_eval_without_a_test_folder_on_one_image_per_class_says_why(
    encoder_dir: Path, few_digits: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from simclr_cli.cli.app import app

    train = tmp_path / "train"
    for digit in ("3", "7"):
        (train / digit).mkdir(parents=True)
        shutil.copy(next((few_digits / digit).iterdir()), train / digit / "only.png")
    command = ["eval", str(train), "-m", str(encoder_dir), "-o", str(tmp_path / "eval")]
    result = CliRunner().invoke(app, [*command, "--workers", "0"])
    assert result.exit_code == 1
    assert "too few images to hold out a validation split" in result.output
    assert "--test" in result.output


def test_finetune_stops_at_a_non_finite_loss_keeping_a_finite_checkpoint(
    encoder_dir: Path, few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretraining had this test; fine-tuning has the same guard and no test of it.
    from simclr_cli.engine import finetune as finetune_module
    from simclr_cli.engine.finetune import FinetuneConfig, finetune
    from simclr_cli.errors import NonFiniteLossError

    real_loss, calls = finetune_module.F.cross_entropy, []

    def loss_that_explodes_at_step_4(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        value = real_loss(*args, **kwargs)  # type: ignore[arg-type]
        return value * float("inf") if len(calls) == 4 else value

    monkeypatch.setattr(finetune_module.F, "cross_entropy", loss_that_explodes_at_step_4)
    run = tmp_path / "run"
    config = FinetuneConfig(
        train_dir=str(few_digits), out_dir=str(run), model=str(encoder_dir),
        label_fraction=1.0, epochs=2, batch_size=20, num_workers=0, device="cpu",
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="loss became inf at step 3"):
        finetune(config)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "model.safetensors").exists()


def test_a_streamed_batch_of_only_unreadable_files_still_counts_for_resume(
    few_digits: Path, tmp_path: Path
) -> None:
    # The loader used to drop a batch whose files all failed, so the run's position in the
    # epoch fell one batch behind and a resume replayed a batch the straight run never saw.
    from dataclasses import replace

    from test_pretrain import InterruptAt, step_records

    from simclr_cli.engine.pretrain import _epoch_order, pretrain, resume_config

    config = _streaming_config(tmp_path / "data", tmp_path / "straight")
    config = replace(config, train=replace(config.train, global_batch_size=8, epochs=2))
    order = _epoch_order(config.train, 0, num_images=32, steps_per_epoch=4)
    junk = set(order[8:16])  # every file of the epoch's second batch
    digits = sorted(few_digits.rglob("*.png"))
    (tmp_path / "data").mkdir()
    for index in range(32):  # names sort in index order, as the scan lists them
        target = tmp_path / "data" / f"{index:02d}.png"
        if index in junk:
            target.write_text("not an image\n")
        else:
            shutil.copy(digits[index], target)

    straight = pretrain(config)
    split_config = replace(config, train=replace(config.train, out_dir=str(tmp_path / "split")))
    first = pretrain(split_config, reporter=InterruptAt(step=2))  # right after the junk batch
    assert first.interrupted
    resumed = pretrain(resume_config(first.run_dir), resume=True)
    expected, got = step_records(straight.run_dir), step_records(resumed.run_dir)
    assert len(expected) >= 5  # epoch 1: 3 of 4 batches trained
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-4)
