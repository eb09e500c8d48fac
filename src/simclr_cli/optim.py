"""Optimisers and the learning-rate schedule of SimCLR pretraining.

LARS: You et al. 2017, https://arxiv.org/abs/1708.03888, as used by SimCLR (appendix B.1):
SGD with momentum where each weight tensor's step is rescaled by a trust ratio
eta * ||w|| / ||g + wd * w||. Biases and batch-norm parameters are excluded from both the
weight decay and the rescaling, as in the paper's implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from simclr_cli.config import OptimConfig, resolved_weight_decay

__all__ = ["LARS", "build_optimizer", "learning_rate_at"]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of SGD with momentum."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, object]],
        *,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        """Groups may set `lars_adapt=False` to skip the trust ratio (biases, norms)."""
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one update to every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad.add(param, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    param_norm = torch.linalg.vector_norm(param)
                    update_norm = torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * param_norm / update_norm
                    # Zero-norm weights or updates (fresh biases, dead units) keep the plain step.
                    ratio = torch.where((param_norm > 0) & (update_norm > 0), trust, 1.0)
                    update = update.mul(ratio)
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _split_decay_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases and normalisation parameters): the latter get no decay or LARS."""
    weights: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (exempt if is_norm or name == "bias" else weights).append(param)
    return weights, exempt


def build_optimizer(model: nn.Module, config: OptimConfig, *, lr: float) -> torch.optim.Optimizer:
    """LARS, SGD or AdamW over the model, with biases and norms exempt from weight decay."""
    weights, exempt = _split_decay_groups(model)
    decay = resolved_weight_decay(config)
    if config.optimizer == "lars":
        lars_groups: list[dict[str, object]] = [
            {"params": weights},
            {"params": exempt, "weight_decay": 0.0, "lars_adapt": False},
        ]
        return LARS(
            lars_groups,
            lr=lr,
            momentum=config.momentum,
            weight_decay=decay,
            trust_coefficient=config.lars_trust_coefficient,
        )
    groups = [{"params": weights, "weight_decay": decay}, {"params": exempt, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def learning_rate_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))
