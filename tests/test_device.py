"""Device and precision choice, `auto` included."""

import json
from pathlib import Path

import pytest
import torch

from simclr_cli import device
from simclr_cli.config import AugmentConfig, RunConfig, TrainConfig
from simclr_cli.device import resolve_device, resolve_precision
from simclr_cli.engine.pretrain import pretrain
from simclr_cli.engine.progress import NullReporter
from simclr_cli.errors import DeviceError

CPU = torch.device("cpu")


def test_auto_on_the_cpu_trains_in_bf16_only_when_forced_or_native(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIMCLR_CPU_BF16", "1")
    assert resolve_precision("auto", CPU, training=True).name == "bf16"
    # Features stay fp32: similarity thresholds downstream would feel bf16 rounding.
    assert resolve_precision("auto", CPU).name == "fp32"
    monkeypatch.setenv("SIMCLR_CPU_BF16", "0")
    assert resolve_precision("auto", CPU, training=True).name == "fp32"
    assert resolve_precision("BF16", CPU).dtype == torch.bfloat16  # asked for, always honoured


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [
        (True, False, "bf16"),  # Zen 4, Cooper Lake
        (False, True, "bf16"),
        (True, True, "bf16"),  # Sapphire Rapids and later
        (False, False, "fp32"),  # AVX2 or plain AVX512: bf16 would be emulated
        (None, None, "fp32"),  # a torch without the probes: unknown, so no gamble
        (None, True, "bf16"),
    ],
)
def test_auto_follows_the_cpu_bf16_probes(
    avx512_bf16: bool | None, amx: bool | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIMCLR_CPU_BF16", raising=False)
    answers = {"_is_avx512_bf16_supported": avx512_bf16, "_is_amx_tile_supported": amx}
    monkeypatch.setattr(device, "_cpu_probe", lambda name: answers[name])
    assert resolve_precision("auto", CPU, training=True).name == expected
    assert resolve_precision("auto", CPU).name == "fp32"
    assert device.cpu_bf16_probes() == {"avx512_bf16": avx512_bf16, "amx_tile": amx}


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(
    native: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Emulated bf16 ran 178x slower than fp32 on an AVX2 CPU: honoured, but said once.
    monkeypatch.setattr(device, "cpu_has_bf16_instructions", lambda: native)
    with caplog.at_level("WARNING", logger="simclr_cli.device"):
        assert resolve_precision("bf16", CPU).name == "bf16"
        assert resolve_precision("fp32", CPU).name == "fp32"
    warned = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warned) == (0 if native else 1)


def test_impossible_choices_are_one_line_errors() -> None:
    with pytest.raises(DeviceError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(DeviceError, match="unknown precision"):
        resolve_precision("fp8", CPU)
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_auto_precision_is_logged_as_resolved(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIMCLR_CPU_BF16", "1")
    config = RunConfig(
        augment=AugmentConfig(image_size=16, flip_prob=0.0),
        train=TrainConfig(data_dir=str(few_digits), out_dir=str(tmp_path / "run"), epochs=1,
                          global_batch_size=32, num_workers=0),
    )  # fmt: skip
    result = pretrain(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    start = next(r for r in records if r.get("kind") == "start")
    assert start["precision"] == "bf16"
    assert (
        json.loads((tmp_path / "run" / "run_config.json").read_text())["train"]["precision"]
        == "auto"
    )
    assert result.step == 1


def test_a_resumed_run_says_when_auto_now_resolves_to_another_precision(
    few_digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Messages(NullReporter):
        def __init__(self) -> None:
            self.lines: list[str] = []

        def message(self, text: str) -> None:
            self.lines.append(text)

    def run(epochs: int, *, resume: bool) -> list[str]:
        config = RunConfig(
            augment=AugmentConfig(image_size=16, flip_prob=0.0),
            train=TrainConfig(data_dir=str(few_digits), out_dir=str(tmp_path / "run"),
                              epochs=epochs, global_batch_size=32, num_workers=0),
        )  # fmt: skip
        messages = Messages()
        pretrain(config, reporter=messages, resume=resume)
        return [line for line in messages.lines if line.startswith("precision:")]

    monkeypatch.setenv("SIMCLR_CPU_BF16", "1")
    assert run(1, resume=False) == []
    assert run(2, resume=True) == []  # same precision: nothing to say
    monkeypatch.setenv("SIMCLR_CPU_BF16", "0")
    said = run(3, resume=True)
    assert said == [
        "precision: this run trained in bf16 until now and continues in fp32 (--precision auto "
        "resolves on each start; SIMCLR_CPU_BF16=1 keeps bf16 on this CPU)"
    ]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["precision"] for r in records if r.get("kind") == "start"] == ["bf16", "bf16", "fp32"]
