"""Training checkpoints and exported encoders, written atomically and loaded safely.

A training checkpoint (`checkpoints/last.pt`) holds plain types and tensors only, so it loads
with `torch.load(weights_only=True)`; nothing is ever unpickled beyond that. An exported
model is a `model.safetensors` plus a `config.json` that says how to rebuild the network and
preprocess images the way training did.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simclr_cli import __version__
from simclr_cli.errors import CheckpointError, os_error_reason

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "MODEL_CONFIG_NAME",
    "MODEL_WEIGHTS_NAME",
    "atomic_write",
    "save_training_checkpoint",
    "clean_state_dict",
    "load_checkpoint",
    "load_exported_model",
    "save_checkpoint",
    "save_exported_model",
    "save_safetensors",
]

CHECKPOINT_FORMAT_VERSION = 1
MODEL_FORMAT = "simclr-cli"
MODEL_FORMAT_VERSION = 1
MODEL_WEIGHTS_NAME = "model.safetensors"
MODEL_CONFIG_NAME = "config.json"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def atomic_write(path: Path, write: Any) -> None:
    """Write through `write(tmp_path)` to a temporary file, fsync, then rename over `path`.

    A process killed at any moment leaves either the old file or the new one, never a mix.
    On failure (a full disk, say) the temporary file is removed and the old file stays.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp's 0600 would hide results from other users; some writers recreate the file,
        # so the mode is set after writing.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not possible on every platform (Windows), hence the guard.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Atomically save a training state with its format and package versions."""
    payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "simclr_version": __version__}
    payload.update(state)
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))


class _RecordingWriter:
    """A file for torch.save that remembers the first OSError its writes raised."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return int(self.handle.write(data))
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(payload: Mapping[str, Any], target: Path) -> None:
    """torch.save, with a failed write (full disk, say) raised as the OSError it is.

    Given a path, torch's zip writer reports a failed write as a RuntimeError ("unexpected
    pos ...") that names no reason; writing through a Python file keeps the real error.
    """
    with open(target, "wb") as handle:
        writer = _RecordingWriter(handle)
        try:
            torch.save(payload, writer)  # type: ignore[arg-type]
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, *, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file, with a failed write raised as an OSError.

    save_file reports I/O failures as a SafetensorError whose text ends in "(os error N)";
    callers handle OSError for every other write, so the same reason reaches the user.
    """
    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def save_training_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """`save_checkpoint` for a training loop, with a failure the user can act on.

    A failed write (full disk, read-only folder) becomes a CheckpointError saying that the
    previous checkpoint survived, which the atomic write guarantees, and what to do.
    """
    had_one = path.is_file()
    try:
        save_checkpoint(path, state)
    except OSError as error:
        kept = "the previous checkpoint is intact" if had_one else "no checkpoint was saved yet"
        raise CheckpointError(
            f"could not write a checkpoint to {path.parent.parent} ({os_error_reason(error)}); "
            f"{kept}. Free some space or choose another --out"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a training checkpoint without unpickling arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing a hostile file; the error
            # below says all the user needs.
            warnings.simplefilter("ignore", UserWarning)
            state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged or hostile files
        raise torch_load_error(
            path, error, what="simclr checkpoints hold only tensors and plain values"
        ) from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {version!r}")
    return state


def torch_load_error(path: Path, error: Exception, *, what: str) -> CheckpointError:
    """A one-line reason for a failed `torch.load(weights_only=True)`.

    torch words every failure as "Weights only load failed" and advises weights_only=False,
    which would run the file's code. Only a pickled global (a function or class to call) is
    code; anything else is a file the safe reader cannot read (text, another format, or a
    pickle written with opcodes it does not know).
    """
    text = str(error).strip()
    if "Unsupported global" in text or "GLOBAL " in text:
        return CheckpointError(f"{path}: refused: loading it would run code from the file; {what}")
    detail = next(
        (
            line.strip()
            for line in text.splitlines()
            if line.strip()
            and not line.lstrip().startswith(("Weights only", "Please file", "("))
            and "weights_only" not in line
        ),
        type(error).__name__,
    )
    # Not necessarily harmless: torch's safe reader also stops at pickle opcodes it does not
    # know (protocol 5 frames, say) before it reaches any code, so say no more than this.
    return CheckpointError(
        f"{path}: cannot be read safely as a torch checkpoint ({detail}); {what}"
    )


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes DDP (`module.`) and torch.compile (`_orig_mod.`) add to keys."""
    cleaned = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        cleaned[key] = value
    return cleaned


def save_exported_model(
    directory: Path, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> None:
    """Write `model.safetensors` and `config.json` into `directory`, each atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(state_dict).items()}
    full_config = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION}
    full_config.update(config)
    full_config["simclr_version"] = __version__
    atomic_write(directory / MODEL_WEIGHTS_NAME, lambda tmp: save_safetensors(tensors, tmp))
    text = json.dumps(full_config, indent=2) + "\n"
    atomic_write(directory / MODEL_CONFIG_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def load_exported_model(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an exported model folder: (state dict, config)."""
    weights, config_path = directory / MODEL_WEIGHTS_NAME, directory / MODEL_CONFIG_NAME
    for required in (weights, config_path):
        if not required.is_file():
            raise CheckpointError(
                f"{directory}: missing {required.name}; expected a run folder or a folder "
                f"holding {MODEL_WEIGHTS_NAME} and {MODEL_CONFIG_NAME}"
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path}: not a readable JSON config ({error})") from None
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{config_path}: not a simclr-cli model config")
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights}: damaged safetensors file ({error})") from None
    return state_dict, config
