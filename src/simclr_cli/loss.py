"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al. 2020, https://arxiv.org/abs/2002.05709, equation (1): each of the 2N views in a
batch has its other view as the positive and the remaining 2(N-1) views as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["nt_xent_loss"]


def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    *,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Mean NT-Xent over the 2N views of a batch, computed in float32.

    Args:
        z_a: Projections of the first views, (N, D); row i pairs with row i of `z_b`.
        z_b: Projections of the second views, (N, D).
        temperature: Softmax temperature applied to the cosine similarities.
        candidates: Optional larger pools of first and second views, (M, D) each, that
            contain `z_a` and `z_b` at rows `offset .. offset + N`; used when negatives are
            gathered from other processes. Defaults to the batch itself.
        offset: Row of `z_a[0]` inside the candidate pools.

    Returns:
        A scalar loss; the batch size is read from the tensors, so a short last batch works.

    Raises:
        ValueError: If shapes disagree or there is no negative (fewer than 2 candidates).
    """
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must both be (N, D), got {tuple(z_a.shape)}, {tuple(z_b.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    pool_a, pool_b = candidates if candidates is not None else (z_a, z_b)
    if pool_a.shape[0] < 2:
        raise ValueError("NT-Xent needs at least 2 images per batch: one alone has no negative")
    n, m = z_a.shape[0], pool_a.shape[0]

    # Cosine similarity is the dot product of unit vectors; float32 whatever the autocast dtype.
    queries = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)  # (2N, D)
    keys = F.normalize(torch.cat([pool_a, pool_b]).float(), dim=1)  # (2M, D)
    logits = queries @ keys.T / temperature  # (2N, 2M)

    # Row i of the queries is key row `self_index[i]`; its positive is the other view's row.
    rows = torch.arange(n, device=z_a.device) + offset
    self_index = torch.cat([rows, rows + m])  # (2N,)
    positive_index = torch.cat([rows + m, rows])  # (2N,)
    logits = logits.masked_fill(F.one_hot(self_index, num_classes=2 * m).bool(), float("-inf"))
    return F.cross_entropy(logits, positive_index)
