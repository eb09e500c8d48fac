import math

import pytest
import torch
import torch.nn.functional as F

from simclr_cli.loss import nt_xent_loss


def loop_reference(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    """NT-Xent written from the paper's algorithm 1, one pair at a time, in float64."""
    views = torch.cat([z_a, z_b]).double()
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n

        def sim(u: int, v: int) -> float:
            return float(F.cosine_similarity(views[u], views[v], dim=0)) / temperature

        denominator = sum(math.exp(sim(i, k)) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(i, positive)) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("batch", [2, 3, 8, 17])
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_loss_matches_a_loop_over_pairs(batch: int, temperature: float) -> None:
    # The vectorised loss equals the pair-by-pair definition for any batch and temperature.
    generator = torch.Generator().manual_seed(batch)
    z_a = torch.randn(batch, 16, generator=generator)
    z_b = torch.randn(batch, 16, generator=generator)
    loss = nt_xent_loss(z_a, z_b, temperature)
    assert loss.item() == pytest.approx(loop_reference(z_a, z_b, temperature), rel=1e-5)


def test_loss_of_perfectly_aligned_orthogonal_pairs_has_closed_form() -> None:
    # Views equal to their pair and orthogonal to the rest: loss = log(1 + (2N-2) e^{-1/t}).
    n, temperature = 4, 0.5
    z = torch.eye(n, 8)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / temperature))
    assert nt_xent_loss(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_symmetric_in_the_two_views_and_scale_invariant() -> None:
    # Swapping the views, or scaling projections, leaves the loss unchanged (cosine similarity).
    generator = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    base = nt_xent_loss(z_a, z_b, 0.2)
    assert nt_xent_loss(z_b, z_a, 0.2).item() == pytest.approx(base.item(), rel=1e-6)
    assert nt_xent_loss(3 * z_a, 0.5 * z_b, 0.2).item() == pytest.approx(base.item(), rel=1e-5)


def test_short_last_batch_and_half_precision_inputs_work_in_float32() -> None:
    # The batch size comes from the tensors, and bf16 inputs give a float32 loss.
    generator = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    loss = nt_xent_loss(z_a.bfloat16(), z_b.bfloat16(), 0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loop_reference(z_a, z_b, 0.5), rel=2e-2)


def test_candidate_pools_with_offset_match_the_loss_over_the_whole_pool() -> None:
    # A slice of a larger batch, with the rest as extra negatives, averages to the full loss.
    generator = torch.Generator().manual_seed(2)
    pool_a, pool_b = torch.randn(8, 6, generator=generator), torch.randn(8, 6, generator=generator)
    full = nt_xent_loss(pool_a, pool_b, 0.3)
    halves = [
        nt_xent_loss(
            pool_a[s : s + 4], pool_b[s : s + 4], 0.3, candidates=(pool_a, pool_b), offset=s
        )
        for s in (0, 4)
    ]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), rel=1e-6)


def test_gradients_flow_to_both_views() -> None:
    # Both inputs receive finite, non-zero gradients.
    z_a = torch.randn(4, 3, requires_grad=True)
    z_b = torch.randn(4, 3, requires_grad=True)
    nt_xent_loss(z_a, z_b, 0.5).backward()
    for grad in (z_a.grad, z_b.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("z_a", "z_b", "temperature", "message"),
    [
        (torch.randn(1, 4), torch.randn(1, 4), 0.5, "at least 2"),
        (torch.randn(3, 4), torch.randn(2, 4), 0.5, "must both be"),
        (torch.randn(3, 4), torch.randn(3, 4), 0.0, "temperature"),
    ],
)
def test_invalid_inputs_raise_value_errors(z_a, z_b, temperature, message) -> None:
    # Bad shapes, a lone image and a zero temperature are refused with a reason.
    with pytest.raises(ValueError, match=message):
        nt_xent_loss(z_a, z_b, temperature)
