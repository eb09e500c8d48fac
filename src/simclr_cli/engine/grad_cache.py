"""Gradient caching: the gradient of a big contrastive batch with activations for a chunk only.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
https://arxiv.org/abs/2101.06983. NT-Xent couples every image with every other, so the batch
cannot simply be split into accumulated micro-batches. Instead:

1. Encode the batch chunk by chunk without autograd, keeping only the features (n, F).
2. Run the projection head and the loss on all features with autograd, and back-propagate:
   this gives the head's gradients and the loss's gradient with respect to each feature.
3. Encode each chunk again, now with autograd, and back-propagate its cached feature
   gradients into the encoder.

The recomputed chunk must be the one step 1 saw: the views are rebuilt from the same drawn
augmentation parameters, and the global torch random state (dropout, should a model have
any) is replayed per chunk. Memory for activations falls from the batch to one chunk, at the
cost of a second encoder forward pass.

Batch norm: the head runs once on the whole batch, so its batch norms are exact. The
encoder's batch norms in training mode normalise each chunk with that chunk's statistics
(like per-device batch norm with the chunk as the device), which is not the full-batch
computation; the gradients are exact for that model. Running statistics are updated once
per chunk, in step 3 only. With `frozen` encoder batch norm (running statistics, no batch
statistics) every image is encoded independently and chunked gradients equal full-batch
ones up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["cached_backward", "chunk_bounds", "freeze_batchnorm"]


def chunk_bounds(
    rows: int, chunk_size: int, *, max_rows: int | None = None
) -> list[tuple[int, int]]:
    """Split `rows` into near-equal chunks of at most `chunk_size`.

    Args:
        rows: Image pairs on this process.
        chunk_size: Largest chunk.
        max_rows: Rows on the busiest process: every process must run the same number of
            chunks, since synchronised batch norm meets the others once per chunk.
    """
    count = max(1, -(-(max_rows or rows) // chunk_size))  # ceiling division
    base, extra = divmod(rows, count)
    bounds, start = [], 0
    for index in range(count):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def freeze_batchnorm(module: nn.Module) -> None:
    """Put the batch norms of `module` in eval mode: running statistics, no batch ones."""
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            layer.eval()


def cached_backward(
    encoder: nn.Module,
    head: nn.Module,
    images: Callable[[int, int], torch.Tensor],
    bounds: list[tuple[int, int]],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """Accumulate the gradient of `objective` into encoder and head, one chunk at a time.

    Args:
        encoder: Maps (2m, 3, S, S) images to (2m, F) features.
        head: Maps (2n, F) features to (2n, P) projections.
        images: `images(start, stop)` returns both views of pairs start..stop, (2m, 3, S, S),
            first views first; called twice per chunk and must return the same pixels.
        bounds: The chunks, as (start, stop) pairs covering 0..n.
        objective: Maps projections of the first and second views, (n, P) each, to the
            scalar to back-propagate.
        autocast: Context for the forward passes (mixed precision).
    """
    n = bounds[-1][1]
    device = _device_of(encoder)
    saved_stats = _running_stats(encoder)

    # 1. Features of every chunk, without activations.
    rng_states, first_views, second_views = [], [], []
    with torch.no_grad():
        for start, stop in bounds:
            rng_states.append(_rng_state(device))
            with autocast():
                features = encoder(images(start, stop))  # (2m, F)
            first_views.append(features[: stop - start])
            second_views.append(features[stop - start :])
    _restore_running_stats(encoder, saved_stats)  # step 3 updates them, once per chunk

    # 2. Head and loss on the whole batch; the gradient stops at the features.
    features = torch.cat(first_views + second_views).detach().requires_grad_()  # (2n, F)
    with autocast():
        projections = head(features)  # (2n, P)
    objective(projections[:n], projections[n:]).backward()  # type: ignore[no-untyped-call]
    assert features.grad is not None
    feature_grads = features.grad  # (2n, F)

    # 3. Each chunk again, with activations, replaying its random state.
    for (start, stop), state in zip(bounds, rng_states, strict=True):
        grads = torch.cat([feature_grads[start:stop], feature_grads[n + start : n + stop]])
        with _replayed_rng(state, device), autocast():
            recomputed = encoder(images(start, stop))  # (2m, F)
        recomputed.backward(grads.to(recomputed.dtype))


def _device_of(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed_rng(
    state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device
) -> Iterator[None]:
    """Run with the random state a chunk had in step 1; restore the current one after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _running_stats(module: nn.Module) -> list[tuple[_BatchNorm, list[torch.Tensor]]]:
    saved = []
    for layer in module.modules():
        if isinstance(layer, _BatchNorm) and layer.training and layer.track_running_stats:
            buffers = [layer.running_mean, layer.running_var, layer.num_batches_tracked]
            saved.append((layer, [b.clone() for b in buffers if b is not None]))
    return saved


def _restore_running_stats(
    module: nn.Module, saved: list[tuple[_BatchNorm, list[torch.Tensor]]]
) -> None:
    with torch.no_grad():
        for layer, values in saved:
            buffers = [layer.running_mean, layer.running_var, layer.num_batches_tracked]
            for buffer, value in zip([b for b in buffers if b is not None], values, strict=True):
                buffer.copy_(value)
