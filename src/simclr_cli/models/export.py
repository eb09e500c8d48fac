"""Exported encoders: what `config.json` records and how a model folder is loaded back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from simclr_cli.checkpoint import (
    MODEL_CONFIG_NAME,
    MODEL_FORMAT,
    MODEL_WEIGHTS_NAME,
    clean_state_dict,
    load_checkpoint,
    load_exported_model,
)
from simclr_cli.config import RunConfig, decode_size, uses_small_stem
from simclr_cli.errors import CheckpointError, ConfigError
from simclr_cli.models.backbone import Backbone, feature_dim
from simclr_cli.models.projection_head import ProjectionHead

__all__ = ["LoadedModel", "export_config", "load_foreign", "load_model", "state_fingerprint"]

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINT_RELATIVE_PATH = Path("checkpoints") / "last.pt"


def export_config(run: RunConfig, training: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to rebuild the network and preprocess images as training did."""
    model, augment = run.model, run.augment
    width = feature_dim(model.arch)
    return {
        "arch": model.arch,
        "small_stem": uses_small_stem(model, augment.image_size),
        "feature_dim": width,
        "projection": {
            "dim": model.projection_dim,
            "layers": model.projection_layers,
            "hidden_dim": model.projection_hidden_dim or width,
        },
        "image_size": augment.image_size,
        "preprocessing": {
            # Evaluation view: shorter side resized to image_size, centre square, RGB in
            # [0, 1], then (x - mean) / std per channel.
            "resize_shorter_side": augment.image_size,
            "center_crop": augment.image_size,
            "decode_size": decode_size(augment),
            "mean": list(augment.mean),
            "std": list(augment.std),
        },
        "training": training,
    }


class LoadedModel:
    """An encoder in eval mode, its optional projection head, and its exported config."""

    def __init__(
        self, backbone: Backbone, projection_head: ProjectionHead | None, config: dict[str, Any]
    ) -> None:
        """Hold the parts; callers move them to their device."""
        self.backbone = backbone.eval()
        self.projection_head = projection_head.eval() if projection_head is not None else None
        self.config = config

    @property
    def image_size(self) -> int:
        """Side of the square images the encoder was trained on."""
        return int(self.config["image_size"])


def load_model(ref: Path | str) -> LoadedModel:
    """Load a model from a run folder, a model folder, a weights file or a Hub repository.

    `ref` is what the user gave `--model`: see `simclr_cli.hub.parse_model_ref` for the Hub
    forms. A folder holding our `model.safetensors` + `config.json` loads as exported; a run
    folder loads its latest checkpoint; any other weights file (or a folder or repository
    with exactly one) goes through `simclr_cli.models.foreign`.
    """
    from simclr_cli.hub import HubRef, parse_model_ref, resolve_model_ref

    parsed = ref if isinstance(ref, Path) else parse_model_ref(ref)
    path = resolve_model_ref(parsed)
    # Configs record where a converted checkpoint came from: the repository, not the cache path.
    hub_label = f"hf://{parsed}/{path.name}" if isinstance(parsed, HubRef) else None
    if path.is_file() and path.name == MODEL_WEIGHTS_NAME and _is_ours(path.parent):
        path = path.parent
    if path.is_file():
        return load_foreign(path, source=hub_label)
    if (path / MODEL_WEIGHTS_NAME).is_file() and _is_ours(path):
        state_dict, config = load_exported_model(path)
    elif (path / CHECKPOINT_RELATIVE_PATH).is_file() and (path / RUN_CONFIG_NAME).is_file():
        state_dict, config = _from_checkpoint(path)
    else:
        return load_foreign(_single_weights_file(path))
    return _build(state_dict, config, source=path)


def load_foreign(path: Path, *, source: str | None = None) -> LoadedModel:
    """Load another project's checkpoint file (see `simclr_cli.models.foreign`).

    `source` names it in messages and in the config (default: the path).
    """
    from simclr_cli.models.foreign import convert_state, read_weights_file

    foreign = convert_state(read_weights_file(path), source=source or str(path))
    return _build(foreign.state_dict, foreign.config, source=path)


def _is_ours(folder: Path) -> bool:
    """Whether `folder` has our config.json; other projects ship a config.json too (timm)."""
    import json

    config_path = folder / MODEL_CONFIG_NAME
    if not config_path.is_file():
        return False  # a bare model.safetensors: someone's state dict (ours is refused there)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True  # ours by name; load_exported_model reports the damage
    return not isinstance(config, dict) or config.get("format") == MODEL_FORMAT


def _single_weights_file(folder: Path) -> Path:
    from simclr_cli.hub import WEIGHT_SUFFIXES

    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    safetensors = [p for p in found if p.suffix == ".safetensors"]
    chosen = safetensors or found
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        raise CheckpointError(
            f"{folder}: not a run folder, a model folder ({MODEL_WEIGHTS_NAME} + "
            f"{MODEL_CONFIG_NAME}) or a folder with a weights file"
        )
    names = ", ".join(p.name for p in chosen)
    raise CheckpointError(f"{folder}: several weights files ({names}); pass one of them")


def _from_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import json

    state = load_checkpoint(run_dir / CHECKPOINT_RELATIVE_PATH)
    run = RunConfig.from_dict(json.loads((run_dir / RUN_CONFIG_NAME).read_text(encoding="utf-8")))
    training = {"step": int(state["step"]), "epochs_completed": int(state["epoch"])}
    return clean_state_dict(state["model"]), export_config(run, training)


def _build(
    state_dict: dict[str, torch.Tensor], config: dict[str, Any], *, source: Path
) -> LoadedModel:
    try:
        arch, small_stem = str(config["arch"]), bool(config["small_stem"])
        projection = config.get("projection") or {}
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{source}: config.json lacks {error}") from None
    try:
        # Built on the meta device and filled by assignment: a 4x-wide ResNet-50 would
        # otherwise spend seconds initialising weights that are overwritten at once.
        with torch.device("meta"):
            backbone = Backbone(arch, small_stem=small_stem)
    except ConfigError as error:
        raise CheckpointError(f"{source}: {error}") from None
    backbone_keys = {
        k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
    }
    _load_strict(backbone, backbone_keys, source=source, part="encoder")
    head = None
    head_keys = {
        k[len("projection_head.") :]: v
        for k, v in state_dict.items()
        if k.startswith("projection_head.")
    }
    if head_keys and projection:
        with torch.device("meta"):
            head = ProjectionHead(
                backbone.feature_dim,
                hidden_dim=int(projection["hidden_dim"]),
                out_dim=int(projection["dim"]),
                num_layers=int(projection["layers"]),
            )
        _load_strict(head, head_keys, source=source, part="projection head")
    return LoadedModel(backbone, head, config)


def _load_strict(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: Path, part: str
) -> None:
    # float32 whatever the file held (a half-precision export must not make the model half).
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # torch's first line only says "Error(s) in loading state_dict"; the next names a tensor.
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "shape or key mismatch")
        raise CheckpointError(f"{source}: the {part} weights do not fit ({detail})") from None


def state_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer, bit for bit, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(
            name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode()
        )
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
