"""The gradient of one step when its batch is split: across processes, into chunks, or both.

A global batch of B images is cut into one contiguous share per process (`EpochShard`).
Every process draws the augmentation parameters of the whole global batch from the step's
seeded stream and keeps the rows of its own images (`StepViews`), so each image gets the
views a single process would give it: a run is the same run whatever the number of
processes, and may resume with another number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from simclr_cli.config import AugmentConfig
from simclr_cli.data.augment import ViewParams, apply_view, normalize, sample_view_params
from simclr_cli.data.loader import CanvasBatch
from simclr_cli.distributed import (
    DistContext,
    Gather,
    contrastive_objective,
    gather_rows,
    share_bounds,
)
from simclr_cli.engine.grad_cache import cached_backward, chunk_bounds
from simclr_cli.models.simclr import SimCLRModel

__all__ = ["EpochShard", "StepResult", "StepViews", "batch_gradients"]


class EpochShard:
    """This process's part of every global batch of one epoch."""

    def __init__(
        self, order: Sequence[int], batch_size: int, context: DistContext, readable: torch.Tensor
    ) -> None:
        """Cut each global batch of `order` (positions into `readable`) into shares.

        Args:
            order: The epoch's positions, all global batches back to back.
            batch_size: The global batch size.
            context: Rank and world size.
            readable: File index of each position (`ImageBatches.readable_indices`).
        """
        self.batch_size = batch_size
        self.global_rows = min(batch_size, len(order))  # a tiny folder is one short batch
        self.start, self.stop = share_bounds(self.global_rows, context.world_size, context.rank)
        self._order = list(order)
        self._readable = readable

    @property
    def share(self) -> int:
        """Images this process takes from each global batch."""
        return self.stop - self.start

    def local_order(self, first_batch: int) -> list[int]:
        """Positions of this process's images from global batch `first_batch` on."""
        positions: list[int] = []
        for offset in range(first_batch * self.batch_size, len(self._order), self.batch_size):
            positions += self._order[offset + self.start : offset + self.stop]
        return positions

    def rows(self, batch_index: int, file_indices: torch.Tensor) -> torch.Tensor:
        """Rows inside global batch `batch_index` of the images that decoded, (n,)."""
        offset = batch_index * self.batch_size
        share = self._readable[self._order[offset + self.start : offset + self.stop]]
        return self.start + torch.isin(share, file_indices).nonzero().squeeze(1)


@dataclass
class StepViews:
    """Augmentation parameters of this process's images; pixels are made on request."""

    canvases: torch.Tensor  # (n, 3, C, C) uint8
    params_a: ViewParams
    params_b: ViewParams
    augment: AugmentConfig
    device: torch.device

    @classmethod
    def draw(
        cls,
        batch: CanvasBatch,
        augment: AugmentConfig,
        generator: torch.Generator,
        *,
        device: torch.device,
        rows: torch.Tensor | None = None,
        global_rows: int = 0,
    ) -> StepViews:
        """Draw both views' parameters as a single process would for the whole batch.

        Args:
            batch: This process's images.
            augment: The augmentation settings.
            generator: The step's augmentation stream.
            device: Where pixels are made.
            rows: Rows of these images inside the global batch; None when they are all of it.
            global_rows: Size of the global batch (with `rows`).
        """
        sizes = batch.sizes.cpu()
        if rows is not None:
            # The draws depend only on the batch size, and each row only on its own size, so
            # placeholder sizes for other processes' images leave this process's rows exact.
            side = batch.canvases.shape[-1]
            full = torch.full((global_rows, 2), side, dtype=sizes.dtype)
            full[rows] = sizes
            sizes = full
        params_a = sample_view_params(augment, sizes, generator)
        params_b = sample_view_params(augment, sizes, generator)
        if rows is not None:
            params_a, params_b = params_a.take(rows), params_b.take(rows)
        return cls(batch.canvases, params_a, params_b, augment, device)

    def __len__(self) -> int:
        """Image pairs."""
        return int(self.canvases.shape[0])

    def images(self, start: int, stop: int) -> torch.Tensor:
        """Both views of images start..stop, first views first, (2m, 3, S, S)."""
        canvases = self.canvases[start:stop].to(self.device, non_blocking=True)
        part, augment = slice(start, stop), self.augment
        view_a = normalize(apply_view(canvases, self.params_a.take(part), augment), augment)
        view_b = normalize(apply_view(canvases, self.params_b.take(part), augment), augment)
        return torch.cat([view_a, view_b]).contiguous(memory_format=torch.channels_last)


@dataclass
class StepResult:
    """The global loss of a step, how many images it saw, and whether any process must stop."""

    loss: float = float("nan")
    images: int = 0
    stop: bool = False


def batch_gradients(
    model: SimCLRModel,
    views: StepViews,
    *,
    temperature: float,
    context: DistContext,
    chunk_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    check: Callable[[float], None] = lambda loss: None,
    stop_requested: bool = False,
    gather: Gather = gather_rows,
) -> StepResult:
    """Gradients of the global NT-Xent loss in `.grad`, equal on every process.

    Args:
        model: The network (batch norms synchronised when there are several processes).
        views: This process's images and their view parameters.
        temperature: NT-Xent temperature.
        context: The process group (world size 1 for a single process).
        chunk_size: Encode at most this many image pairs at a time (gradient caching).
        autocast: Mixed-precision context for forward passes.
        scale: Applied to the objective before backward (the fp16 loss scaler).
        check: Called with the global loss before any backward pass; may raise.
        stop_requested: This process was asked to stop; the answer is any process's.
        gather: How projections are collected from the processes.
    """
    device = views.device
    counts = context.counts(len(views), device)
    result = StepResult(images=sum(counts))

    def objective(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        backward_me, share = contrastive_objective(
            z_a, z_b, temperature, counts=counts, gather=gather
        )
        # One reduction tells every process the loss and whether any of them must stop.
        loss, stops = context.sum_scalars([float(share), float(stop_requested)], device)
        result.loss, result.stop = loss, stops > 0
        check(loss)
        return scale(backward_me)

    if chunk_size is None:
        images = views.images(0, len(views))
        with autocast():
            projections = model(images)  # (2n, P)
        n = len(views)
        objective(projections[:n], projections[n:]).backward()  # type: ignore[no-untyped-call]
    else:
        bounds = chunk_bounds(len(views), chunk_size, max_rows=max(counts))
        encoder, head = model.backbone, model.projection_head
        cached_backward(encoder, head, views.images, bounds, objective, autocast=autocast)
    context.average_gradients(model)
    return result
