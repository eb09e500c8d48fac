import warnings
from pathlib import Path

import pytest
import torch

from simclr_cli.checkpoint import (
    atomic_write,
    clean_state_dict,
    load_checkpoint,
    load_exported_model,
    save_checkpoint,
    save_exported_model,
)
from simclr_cli.errors import CheckpointError


class _Boom:
    def __reduce__(self):  # runs code when unpickled, as a hostile checkpoint would
        return (Path.touch, (Path("/tmp/simclr-test-pwned"),))


def test_checkpoint_round_trips_tensors_and_plain_values(tmp_path: Path) -> None:
    # Saved state comes back equal, with the format version recorded.
    state = {"model": {"w": torch.arange(4.0)}, "step": 7, "config": {"a": [1, 2]}}
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    assert loaded["format_version"] == 1


def test_checkpoint_with_pickled_code_is_refused_without_running_it(tmp_path: Path) -> None:
    # weights_only loading rejects arbitrary objects; the payload never executes.
    marker = Path("/tmp/simclr-test-pwned")
    marker.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": _Boom()}, path, pickle_protocol=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's pickle-protocol warning must not leak out
        with pytest.raises(
            CheckpointError, match="refused: loading it would run code|cannot be read safely"
        ) as caught:
            load_checkpoint(path)
    assert not marker.exists()
    # torch's own message advises weights_only=False, which would run the payload.
    assert "weights_only" not in str(caught.value)


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path: Path) -> None:
    # A crash mid-write (here: an exception) leaves the old checkpoint intact.
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_wrapper_prefixes_are_stripped() -> None:
    # DDP's module. and torch.compile's _orig_mod. prefixes disappear, in any order.
    state = {"module._orig_mod.backbone.w": torch.zeros(1), "head.b": torch.ones(1)}
    assert set(clean_state_dict(state)) == {"backbone.w", "head.b"}


def test_exported_model_is_safetensors_plus_config(tmp_path: Path) -> None:
    # Export writes loadable safetensors and a config with the format marker.
    save_exported_model(tmp_path, {"module.backbone.w": torch.ones(2)}, {"arch": "resnet18"})
    weights, config = load_exported_model(tmp_path)
    assert torch.equal(weights["backbone.w"], torch.ones(2))
    assert config["arch"] == "resnet18" and config["format"] == "simclr-cli"


def test_damaged_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    # A truncated download is reported, never half-loaded.
    save_exported_model(tmp_path, {"backbone.w": torch.ones(1000)}, {"arch": "resnet18"})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="damaged"):
        load_exported_model(tmp_path)
