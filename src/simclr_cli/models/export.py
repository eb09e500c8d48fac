"""Exported encoders: what `config.json` records and how a model folder is loaded back."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from simclr_cli.checkpoint import (
    MODEL_CONFIG_NAME,
    MODEL_WEIGHTS_NAME,
    clean_state_dict,
    load_checkpoint,
    load_exported_model,
)
from simclr_cli.config import ModelConfig, RunConfig, decode_size, uses_small_stem
from simclr_cli.errors import CheckpointError
from simclr_cli.models.backbone import Backbone, feature_dim
from simclr_cli.models.projection_head import ProjectionHead

__all__ = ["LoadedModel", "export_config", "load_model", "state_fingerprint"]

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


def load_model(path: Path | str) -> LoadedModel:
    """Load an exported model folder, or the latest checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such model folder")
    if path.is_file() and path.name == MODEL_WEIGHTS_NAME:
        path = path.parent
    if (path / MODEL_WEIGHTS_NAME).is_file():
        state_dict, config = load_exported_model(path)
    elif (path / CHECKPOINT_RELATIVE_PATH).is_file() and (path / RUN_CONFIG_NAME).is_file():
        state_dict, config = _from_checkpoint(path)
    else:
        raise CheckpointError(
            f"{path}: neither a model folder ({MODEL_WEIGHTS_NAME} + {MODEL_CONFIG_NAME}) "
            "nor a run folder with a checkpoint"
        )
    return _build(state_dict, config, source=path)


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
        model_config = ModelConfig(arch=config["arch"], small_stem=bool(config["small_stem"]))
        projection = config.get("projection") or {}
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{source}: config.json lacks {error}") from None
    backbone = Backbone(model_config.arch, small_stem=bool(model_config.small_stem))
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
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = str(error).splitlines()[0] if str(error) else "shape or key mismatch"
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
