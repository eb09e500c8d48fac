"""The projection MLP g(.) that maps features to the space where NT-Xent is computed.

Hidden layers are Linear -> BatchNorm -> ReLU (SimCLR v2, https://arxiv.org/abs/2006.10029,
found batch norm and a third layer help); the output layer is a plain Linear. Only the loss
sees its output: downstream tasks use the encoder's features.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """MLP with `num_layers` linear layers (2 or 3)."""

    def __init__(self, in_dim: int, *, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        """Build the head; `num_layers` counts linear layers, the last one included."""
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [
                nn.Linear(width, hidden_dim, bias=False),
                nn.BatchNorm1d(hidden_dim),
                nn.ReLU(inplace=True),
            ]
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Projections, (B, out_dim)."""
        projections: torch.Tensor = self.layers(features)
        return projections
