"""The SimCLR network: encoder f(.) followed by projection head g(.)."""

from __future__ import annotations

import torch
from torch import nn

from simclr_cli.config import ModelConfig, uses_small_stem
from simclr_cli.models.backbone import Backbone
from simclr_cli.models.projection_head import ProjectionHead

__all__ = ["SimCLRModel", "build_model"]


class SimCLRModel(nn.Module):
    """Holds `backbone` and `projection_head`; forward returns the projections."""

    def __init__(self, backbone: Backbone, projection_head: ProjectionHead) -> None:
        """Combine an encoder and a head."""
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Projections of a batch of images, (B, projection_dim)."""
        projections: torch.Tensor = self.projection_head(self.backbone(images))
        return projections


def build_model(config: ModelConfig, *, image_size: int) -> SimCLRModel:
    """A randomly initialised SimCLR network as the config describes."""
    backbone = Backbone(config.arch, small_stem=uses_small_stem(config, image_size))
    hidden = config.projection_hidden_dim or backbone.feature_dim
    head = ProjectionHead(
        backbone.feature_dim,
        hidden_dim=hidden,
        out_dim=config.projection_dim,
        num_layers=config.projection_layers,
    )
    return SimCLRModel(backbone, head)
