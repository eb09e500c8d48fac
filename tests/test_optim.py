import math

import pytest
import torch
from torch import nn

from simclr_cli.config import OptimConfig
from simclr_cli.optim import LARS, build_optimizer, learning_rate_at


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_zero() -> None:
    # Warmup reaches the peak at its last step; the cosine half-way point is half the peak.
    peak, total, warmup = 1.2, 110, 10
    lrs = [
        learning_rate_at(s, peak_lr=peak, total_steps=total, warmup_steps=warmup)
        for s in range(total)
    ]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)
    assert lrs[warmup + 50] == pytest.approx(peak / 2)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    assert learning_rate_at(
        total, peak_lr=peak, total_steps=total, warmup_steps=warmup
    ) == pytest.approx(0.0)


def test_lars_exempts_biases_and_norms_from_decay_and_adaptation() -> None:
    # Conv/linear weights get weight decay and trust ratios; biases and batch norm get neither.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    optimizer = build_optimizer(model, OptimConfig(optimizer="lars", weight_decay=1e-4), lr=0.1)
    decayed, exempt = optimizer.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert exempt["weight_decay"] == 0 and exempt["lars_adapt"] is False
    assert decayed["weight_decay"] == 1e-4 and decayed["lars_adapt"] is True
    assert len(exempt["params"]) == 4  # conv bias, BN weight and bias, linear bias


def test_lars_step_scales_the_update_by_the_trust_ratio() -> None:
    # First step: w <- w - lr * eta * ||w|| / ||g + wd w|| * (g + wd w).
    weight = nn.Parameter(torch.tensor([3.0, 4.0]))
    weight.grad = torch.tensor([0.6, 0.8])
    optimizer = LARS([weight], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    update = torch.tensor([0.6, 0.8]) + 0.1 * torch.tensor([3.0, 4.0])
    trust = 0.01 * 5.0 / float(update.norm())
    expected = torch.tensor([3.0, 4.0]) - 0.5 * trust * update
    optimizer.step()
    assert torch.allclose(weight.detach(), expected, atol=1e-6)


def test_lars_leaves_zero_weights_with_the_plain_step() -> None:
    # A zero-norm tensor would get a zero trust ratio; it takes the unscaled step instead.
    weight = nn.Parameter(torch.zeros(3))
    weight.grad = torch.ones(3)
    LARS([weight], lr=0.1).step()
    assert torch.allclose(weight.detach(), torch.full((3,), -0.1))
    assert not math.isnan(float(weight.detach().sum()))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_alternative_optimizers_are_built(name: str) -> None:
    # SGD and AdamW are offered too, with the same decay split.
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(optimizer=name), lr=0.01)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["weight_decay"] == 0
