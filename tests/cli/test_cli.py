import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simclr_cli import __version__
from simclr_cli.cli.app import app
from simclr_cli.config import RunConfig

runner = CliRunner()


def test_version_is_printed() -> None:
    # `simclr --version` names the package and its version.
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_help_does_not_import_torch() -> None:
    # The command line imports torch only when a command runs, so --help is instant.
    code = "import sys, simclr_cli.cli.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_runs_the_same_cli() -> None:
    # `python -m simclr_cli` is the same program as `simclr`.
    out = subprocess.run([sys.executable, "-m", "simclr_cli", "--version"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == f"simclr-cli {__version__}"


def test_the_command_keeps_freed_memory_before_running(monkeypatch: pytest.MonkeyPatch) -> None:
    # The console entry point sets malloc up for the process before the command runs (the
    # effect itself is measured in tests/test_allocator.py).
    import simclr_cli.allocator
    import simclr_cli.console
    from simclr_cli.cli.app import main

    calls: list[str] = []
    monkeypatch.setattr(simclr_cli.allocator, "keep_freed_memory", lambda: calls.append("k"))
    # Recorded, not run: it would swap this test process's sys.stdout for good.
    monkeypatch.setattr(
        simclr_cli.console, "keep_going_when_the_reader_leaves", lambda: calls.append("pipe")
    )
    monkeypatch.setattr(sys, "argv", ["simclr", "--version"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0 and calls == ["pipe", "k"]


def test_pretrain_flags_build_the_config_the_engine_receives(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given options land in the config; options not given keep the dataclass defaults.
    captured: dict[str, object] = {}

    def fake_pretrain(config: RunConfig, *, reporter: object, resume: bool) -> None:
        captured["config"], captured["resume"] = config, resume
        raise SystemExit(0)

    monkeypatch.setattr("simclr_cli.engine.pretrain.pretrain", fake_pretrain)
    args = [
        "pretrain",
        str(tmp_path),
        "-o",
        str(tmp_path / "run"),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--image-size",
        "32",
        "--arch",
        "resnet34",
        "--optimizer",
        "adamw",
        "--temperature",
        "0.2",
        "--crop-min-area",
        "0.3",
        "--flip-prob",
        "0",
    ]
    runner.invoke(app, args)
    config = captured["config"]
    assert isinstance(config, RunConfig) and captured["resume"] is False
    assert (config.train.epochs, config.train.global_batch_size) == (3, 64)
    assert config.train.temperature == 0.2 and config.train.out_dir == str(tmp_path / "run")
    assert config.augment.image_size == 32 and config.augment.crop_area == (0.3, 1.0)
    assert config.augment.flip_prob == 0.0 and config.augment.jitter_strength == 1.0
    assert config.model.arch == "resnet34" and config.optim.optimizer == "adamw"
    assert config.optim.base_lr is None and config.train.seed == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pretrain", "{tmp}/missing"], "no such folder"),
        (["pretrain", "{tmp}/empty"], "no images found"),
        (["pretrain"], "give the folder"),
        (["pretrain", "{tmp}/empty", "--batch-size", "1"], "at least 2"),
        (["pretrain", "{tmp}/empty", "--device", "cuda:7"], "CUDA"),
        (["pretrain", "--resume", "{tmp}/empty"], "not a run folder"),
        (["embed", "{tmp}/empty", "--model", "{tmp}/nomodel"], "no such model folder"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_one(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # User mistakes print one error line, no traceback, exit with status 1, and write nothing.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_model_options(tmp_path: Path, few_digits: Path) -> None:
    # Changing the architecture of a run on resume is refused before any training.
    from simclr_cli.config import build_run_config

    run = tmp_path / "run"
    run.mkdir()
    config = build_run_config(train={"data_dir": str(few_digits), "out_dir": str(run)})
    (run / "run_config.json").write_text(__import__("json").dumps(config.to_dict()))
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--arch", "resnet50"])
    assert result.exit_code == 1 and "cannot change --arch when resuming" in result.stderr


def test_resume_names_the_options_it_refuses_as_typed(
    tmp_path: Path, few_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The config calls them base_lr, global_batch_size and crop_area; the user typed these.
    from simclr_cli.config import build_run_config

    run = tmp_path / "run"
    run.mkdir()
    config = build_run_config(train={"data_dir": str(few_digits), "out_dir": str(run)})
    (run / "run_config.json").write_text(__import__("json").dumps(config.to_dict()))
    args = ["pretrain", "--resume", str(run), "--lr", "0.1", "-b", "64", "--crop-min-area", "0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: cannot change --batch-size, --crop-min-area, --lr when resuming")
    assert "base_lr" not in line and "global_batch_size" not in line

    # Repeating the run's own values is no change: the run goes on.
    resumed: list[RunConfig] = []

    def fake_pretrain(config: RunConfig, *, reporter: object, resume: bool) -> None:
        resumed.append(config)
        raise SystemExit(0)

    monkeypatch.setattr("simclr_cli.engine.pretrain.pretrain", fake_pretrain)
    args = ["pretrain", "--resume", str(run), "--crop-min-area", "0.08", "-b", "256"]
    result = runner.invoke(app, args)
    assert len(resumed) == 1, result.output


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_crop_min_area_outside_zero_to_one_is_refused_not_replaced_by_the_default(
    value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photo_file: Path
) -> None:
    # 0 was taken as "not given" and silently became 0.08.
    def fake_pretrain(config: RunConfig, *, reporter: object, resume: bool) -> None:
        raise AssertionError(f"pretrain ran with crop area {config.augment.crop_area}")

    monkeypatch.setattr("simclr_cli.engine.pretrain.pretrain", fake_pretrain)
    expected = f"error: --crop-min-area must be in (0, 1], got {value}"
    result = runner.invoke(app, ["pretrain", str(tmp_path), "--crop-min-area", value])
    assert result.exit_code == 1 and result.stderr == expected + "\n", result.output
    views = tmp_path / "views.png"
    args = ["augment-preview", str(photo_file), "--crop-min-area", value, "-o", str(views)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and result.stderr == expected + "\n", result.output
    assert not views.exists()


def test_an_interrupted_run_exits_with_130(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A run stopped by Ctrl-C must not look like success to `&&` chains and schedulers.
    from simclr_cli.engine.pretrain import PretrainResult

    def interrupted(config: RunConfig, *, reporter: object, resume: bool) -> PretrainResult:
        return PretrainResult(tmp_path, 3, 0, float("nan"), 10, {}, True, 1.0)

    monkeypatch.setattr("simclr_cli.engine.pretrain.pretrain", interrupted)
    result = runner.invoke(app, ["pretrain", str(tmp_path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 130 and "interrupted" in result.stdout
    # Stopped in its first epoch, there is no epoch loss to show; "nan" would look broken.
    assert "no epoch finished yet" in result.stdout and "nan" not in result.stdout


def test_resume_with_out_is_refused(tmp_path: Path) -> None:
    # --resume continues a run where it is; a second folder would be silently ignored.
    result = runner.invoke(app, ["pretrain", "--resume", str(tmp_path), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "drop -o" in result.stderr


def test_a_file_in_the_way_of_the_output_stops_commands_before_any_work(
    few_digits: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["pretrain", str(few_digits), "-o", str(blocker), "--epochs", "1"])
    assert result.exit_code == 1
    assert "is a file; -o/--out needs a folder there" in result.output
    assert "decoding" not in result.output and "Traceback" not in result.output
    # An index that does not exist would be the next error; the output is checked first.
    result = runner.invoke(
        app, ["duplicates", "--index", str(tmp_path / "none.npy"), "-o", f"{blocker}/d.csv"]
    )
    assert result.exit_code == 1 and f"{blocker} is a file, not a folder" in result.output


def test_running_out_of_memory_in_a_step_is_one_actionable_line(
    tmp_path: Path, few_digits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The step asks torch for an impossible tensor: torch's own allocator error, several
    # lines of it on CUDA, becomes one line naming what to change.
    import torch

    from simclr_cli.models.simclr import SimCLRModel

    def greedy_forward(self: SimCLRModel, images: torch.Tensor) -> torch.Tensor:
        return torch.empty(2**50, dtype=torch.uint8)  # 1 PiB

    monkeypatch.setattr(SimCLRModel, "forward", greedy_forward)
    args = ["pretrain", str(few_digits), "-o", str(tmp_path / "run"), "--image-size", "16"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--workers", "0"])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "out of memory on the CPU (RAM)" in error[0]
    assert "--batch-size" in error[0] and "--chunk-size" in error[0]
    assert "Traceback" not in result.output


def test_cpu_out_of_memory_names_the_malloc_setting_only_when_it_is_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import simclr_cli.allocator
    from simclr_cli.errors import out_of_memory_message

    error = RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried")
    monkeypatch.setattr(simclr_cli.allocator, "_kept", True)
    kept = out_of_memory_message(error)
    monkeypatch.setattr(simclr_cli.allocator, "_kept", False)
    shipped = out_of_memory_message(error)
    assert kept is not None and "SIMCLR_MALLOC=default" in kept
    assert shipped is not None and "SIMCLR_MALLOC" not in shipped
    gpu = out_of_memory_message(torch_oom())
    assert gpu is not None and "SIMCLR_MALLOC" not in gpu


def torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")


def test_an_unknown_malloc_setting_is_one_warning_line_and_the_command_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import simclr_cli.allocator
    import simclr_cli.console
    from simclr_cli.cli.app import main

    calls: list[str] = []
    monkeypatch.setattr(simclr_cli.allocator, "keep_freed_memory", lambda: calls.append("k"))
    monkeypatch.setattr(simclr_cli.console, "keep_going_when_the_reader_leaves", lambda: None)
    monkeypatch.setattr(sys, "argv", ["simclr", "--version"])
    for value, warned in (("bogus", True), ("default", False), ("Keep", False), ("", False)):
        monkeypatch.setenv("SIMCLR_MALLOC", value)
        with pytest.raises(SystemExit) as done:
            main()
        err = capsys.readouterr().err
        assert done.value.code == 0
        if warned:
            assert err.count("\n") == 1 and err.startswith("warning: SIMCLR_MALLOC='bogus'")
            assert "'default'" in err
        else:
            assert "SIMCLR_MALLOC" not in err
    assert calls == ["k"] * 4


def test_cuda_out_of_memory_is_recognised_by_its_type() -> None:
    import torch

    from simclr_cli.errors import out_of_memory_message

    error = torch.OutOfMemoryError("Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total)")
    message = out_of_memory_message(error)
    assert message is not None and message.startswith("out of memory on the GPU")
    assert out_of_memory_message(RuntimeError("shape mismatch")) is None


def test_training_carries_on_when_the_reader_of_its_output_goes_away(
    tmp_path: Path, few_digits: Path
) -> None:
    # `simclr pretrain ... 2>&1 | head -2`: head exits after two lines and the pipe closes.
    # Python then raised BrokenPipeError on the next progress line and the run ended there.
    run = tmp_path / "run"
    args = [sys.executable, "-m", "simclr_cli", "pretrain", str(few_digits), "-o", str(run)]
    args += ["--image-size", "16", "--epochs", "2", "--batch-size", "16", "--workers", "0"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    first_lines = [process.stdout.readline() for _ in range(2)]
    process.stdout.close()  # what head does after its lines
    assert process.wait(timeout=600) == 0
    assert b"simclr" in first_lines[0]
    assert (run / "model.safetensors").is_file()
