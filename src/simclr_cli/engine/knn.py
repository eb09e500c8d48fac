"""k-nearest-neighbour classification of frozen features.

Weighted voting as in Wu et al. 2018, https://arxiv.org/abs/1805.01978 (the protocol most
SimCLR re-implementations report): cosine similarity on L2-normalised features, the k nearest
training images vote for their class with weight exp(similarity / temperature).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_top1"]


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, num_classes) for each query; the argmax is the prediction."""
    bank = F.normalize(bank.float(), dim=1)  # (N, D)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = F.normalize(queries[start : start + chunk_size].float(), dim=1)  # (q, D)
        similarity = chunk @ bank.T  # (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (q, k)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[top_index], weights)  # (q, C)
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy (0..1) of weighted kNN."""
    scores = knn_predict(
        bank, bank_labels, queries, num_classes=num_classes, k=k, temperature=temperature
    )
    return float((scores.argmax(dim=1) == query_labels).float().mean())
