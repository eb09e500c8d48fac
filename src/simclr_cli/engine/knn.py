"""k-nearest-neighbour classification of frozen features.

Weighted voting as in Wu et al. 2018, https://arxiv.org/abs/1805.01978 (the protocol most
SimCLR re-implementations report): cosine similarity on L2-normalised features, the k nearest
training images vote for their class with weight exp(similarity / temperature). Majority
voting counts one vote per neighbour instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_predict", "knn_top1", "topk_accuracy"]


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float | None = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, num_classes) for each query; the argmax is the prediction.

    Args:
        bank: Training features (N, D); any scale, they are L2-normalised here.
        bank_labels: Class index of each bank row, (N,).
        queries: Features to classify (Q, D); also normalised here.
        num_classes: Width of the score matrix.
        k: Neighbours consulted (capped at N).
        temperature: Weighted voting with exp(similarity / temperature); None for majority
            voting, where equal vote counts are split by the summed similarity of the voters.
        chunk_size: Queries per similarity matrix, bounding memory at chunk_size x N.

    A class no neighbour voted for scores exactly 0, every other class more than 0.
    """
    bank = F.normalize(bank.float(), dim=1)  # (N, D)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = F.normalize(queries[start : start + chunk_size].float(), dim=1)  # (q, D)
        similarity = chunk @ bank.T  # (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (q, k)
        if temperature is None:
            # Counts dominate; (similarity + 1) / 2 lies in [0, 1], so k neighbours add less
            # than (k + 1) and can only order classes with equal counts.
            weights = (k + 1) + (top_similarity + 1) / 2
        else:
            weights = (top_similarity / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[top_index], weights)  # (q, C)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true class is among the k best-scored ones (0..1).

    A class scored 0 got no vote and never counts as predicted, so top-5 of a 3-neighbour
    vote is not inflated by arbitrary picks among unvoted classes.
    """
    if len(labels) == 0:
        return float("nan")
    k = min(k, scores.shape[1])
    top_scores, top_classes = scores.topk(k, dim=1)  # (Q, k)
    hits = (top_classes == labels[:, None]) & (top_scores > 0)
    return float(hits.any(dim=1).float().mean())


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float | None = 0.1,
) -> float:
    """Top-1 accuracy (0..1) of kNN voting."""
    scores = knn_predict(
        bank, bank_labels, queries, num_classes=num_classes, k=k, temperature=temperature
    )
    return topk_accuracy(scores, query_labels, 1)
