"""An encoder plus a linear head over its features: what `simclr finetune` trains.

Saved like an exported encoder (`model.safetensors` + `config.json`), with the head under
`classifier.` and the class names in the config, so every command that loads an encoder
also accepts a fine-tuned classifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from simclr_cli.checkpoint import MODEL_WEIGHTS_NAME, load_exported_model
from simclr_cli.errors import CheckpointError
from simclr_cli.models.backbone import Backbone
from simclr_cli.models.export import LoadedModel

__all__ = ["Classifier", "LoadedClassifier", "load_classifier"]


class Classifier(nn.Module):
    """`backbone` features (B, D) -> `classifier` logits (B, C)."""

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        """A new linear head on an encoder."""
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of normalised images."""
        logits: torch.Tensor = self.classifier(self.backbone(images))
        return logits


class LoadedClassifier:
    """A classifier in eval mode with its class names and preprocessing."""

    def __init__(self, network: Classifier, config: dict[str, Any]) -> None:
        """Hold the network and its config."""
        self.network = network.eval()
        self.config = config
        self.class_names: list[str] = list(config["class_names"])

    def as_encoder(self) -> LoadedModel:
        """The encoder part, for code that needs features (the same module, not a copy)."""
        return LoadedModel(self.network.backbone, None, self.config)


def load_classifier(ref: Path | str) -> LoadedClassifier:
    """Load a folder written by `simclr finetune`, local or a Hub repository holding one."""
    from simclr_cli.hub import resolve_model_ref

    path = resolve_model_ref(ref)
    if path.is_file() and path.name == MODEL_WEIGHTS_NAME:
        path = path.parent
    if not (path / MODEL_WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: not a classifier folder (no {MODEL_WEIGHTS_NAME})")
    state_dict, config = load_exported_model(path)
    if config.get("task") != "classification" or not config.get("class_names"):
        raise CheckpointError(
            f"{path}: this is an encoder without a classifier; train one with simclr finetune"
        )
    network = Classifier(
        Backbone(config["arch"], small_stem=bool(config["small_stem"])),
        len(config["class_names"]),
    )
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "shape or key mismatch")
        raise CheckpointError(f"{path}: the classifier weights do not fit ({detail})") from None
    return LoadedClassifier(network, config)
