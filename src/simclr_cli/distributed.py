"""Data-parallel plumbing for pretraining: one process per device, launched by `torchrun`.

`setup` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), picks the device and backend (NCCL on CUDA, gloo on the CPU, overridable) and
joins the process group. With one process it returns a context whose helpers do nothing, so
the single-process path runs exactly as before.

The contrastive loss needs every process's embeddings as negatives. `gather_rows` is an
autograd function: forward concatenates the rows of all processes; backward sums the
gradient that every process's loss sends to each row and hands each process the part for
its own rows. Batch norm is synchronised with `nn.SyncBatchNorm` on CUDA and with
`GlobalBatchNorm` (below) elsewhere, because torch's version refuses CPU tensors.

Gradients are averaged with one all-reduce after the backward pass instead of through
DistributedDataParallel: the gradient-caching step runs several backward passes per update
(head, then each encoder chunk), and one explicit reduction serves both paths. The cost is
that communication does not overlap the backward pass as DDP's bucketed hooks would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclr_cli.device import resolve_device
from simclr_cli.errors import ConfigError, SimclrError
from simclr_cli.loss import nt_xent_loss

__all__ = [
    "BACKENDS",
    "DistContext",
    "GlobalBatchNorm",
    "Gather",
    "all_reduce_sum",
    "contrastive_objective",
    "convert_sync_batchnorm",
    "gather_rows",
    "in_launched_worker",
    "setup",
    "share_bounds",
    "teardown",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "nccl", "gloo")
_TIMEOUT = timedelta(minutes=30)  # a slow image folder on one node must not kill the others

# A function that concatenates the rows of every process: (local rows, counts) -> (pool, offset).
Gather = Callable[[torch.Tensor, list[int]], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run; world_size 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    owns_group: bool = False  # this module joined the group, so it leaves it at the end

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, plots and progress."""
        return self.rank == 0

    def counts(self, local_rows: int, device: torch.device) -> list[int]:
        """The number of rows every process holds this step (they differ after skipped files)."""
        if not self.enabled:
            return [local_rows]
        mine = torch.tensor([local_rows], device=device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine)
        return [int(count) for count in everyone]

    def sum_scalars(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of a few numbers across processes (one small all-reduce)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return [float(value) for value in tensor.tolist()]

    def average_gradients(self, model: nn.Module) -> None:
        """Replace every gradient by its mean over processes, in one flat all-reduce."""
        if not self.enabled:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # (total parameters,)
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def broadcast_module(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process (as DDP does at start)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value of a picklable object, on every process."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, action: Callable[[], Any]) -> Any:
        """Run `action` on rank 0 only; an error there is raised on every process.

        Without this, a user error on rank 0 (an occupied run folder, say) would leave the
        other processes waiting for it in the next collective until the timeout.
        """
        if not self.enabled:
            return action()
        result, failure = None, None
        if self.is_main:
            try:
                result = action()
            except SimclrError as error:
                failure = (type(error), str(error))
        failure = self.broadcast_object(failure)
        if failure is not None:
            error_type, message = failure
            raise error_type(message)
        return result


def in_launched_worker() -> bool:
    """Whether torchrun (or `--devices`) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str, backend: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the run's process group if torchrun started several processes.

    Args:
        device_name: The --device setting; under torchrun `auto` and `cuda` mean
            cuda:LOCAL_RANK.
        backend: `auto` (NCCL on CUDA, gloo otherwise), `nccl` or `gloo`.

    Returns:
        The context and this process's device.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown distributed backend {backend!r}; use auto, nccl or gloo")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(), resolve_device(device_name)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _rank_device(device_name, local_rank)
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError("the NCCL backend needs CUDA devices; use --dist-backend gloo on CPUs")
    if dist.is_initialized():  # a caller (a test, a notebook) already joined a group
        return DistContext(rank, world_size, local_rank, dist.get_backend(), False), device
    options: dict[str, Any] = {"backend": chosen, "timeout": _TIMEOUT}
    if chosen == "nccl":
        options["device_id"] = device  # binds the communicator to this process's GPU
    dist.init_process_group(**options)
    logger.debug("rank %d of %d joined the %s group on %s", rank, world_size, chosen, device)
    return DistContext(rank, world_size, local_rank, chosen, True), device


def _rank_device(name: str, local_rank: int) -> torch.device:
    """One device per process: cuda:LOCAL_RANK for CUDA, the CPU otherwise."""
    name = name.strip().lower()
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"process {local_rank} on this node has no GPU of its own "
                f"({torch.cuda.device_count()} visible); start at most that many per node"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name.startswith("cuda:"):
        raise ConfigError(
            "with several processes each one uses cuda:LOCAL_RANK; pass --device cuda (or auto) "
            "and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if name == "mps":
        raise ConfigError("MPS is one device; several processes cannot share it (use --device cpu)")
    if name == "auto":
        return torch.device("cpu")
    return resolve_device(name)


def teardown(context: DistContext) -> None:
    """Leave the process group if `setup` joined it."""
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def share_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a global batch of `total` rows that one process takes.

    Shares differ by at most one row when `total` does not divide evenly.
    """
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns each process its rows' gradient."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        width = max(counts)
        padded = local.new_zeros((width, *local.shape[1:]))  # all_gather needs equal shapes
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.start = sum(counts[:rank])
        ctx.stop = ctx.start + counts[rank]
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad_pool: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # Every process's loss depends on every row: a row's gradient is the sum of what
        # each process's loss sends to it, and only its owner back-propagates it further.
        total = grad_pool.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.start : ctx.stop], None, None


def gather_rows(local: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, int]:
    """The rows of every process, in rank order, and where this process's rows start.

    Args:
        local: This process's rows, (n, ...).
        counts: Rows held by each process (from `DistContext.counts`).

    Returns:
        (pool, offset): pool is (sum(counts), ...) and carries gradients back to `local`.
    """
    if len(counts) == 1:
        return local, 0
    rank = dist.get_rank()
    pool: torch.Tensor = _GatherRows.apply(local, counts, rank)
    return pool, sum(counts[:rank])


class _AllReduceSum(torch.autograd.Function):
    """Sum across processes; its gradient is the sum of every process's gradient."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> torch.Tensor:
        grad = grad_total.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(local: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of a tensor over all processes (identity with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    total: torch.Tensor = _AllReduceSum.apply(local)
    return total


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics cover the batch of every process.

    A plain-autograd counterpart of `nn.SyncBatchNorm` for devices that module refuses
    (the CPU, with gloo). Mean and variance are two all-reduced sums (the second of squared
    deviations, which is more accurate than E[x^2] - E[x]^2); autograd differentiates
    through both reductions, so the backward pass is the full-batch one. With one process,
    or in eval mode, it is ordinary batch norm. State-dict keys are those of BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with statistics over all processes' rows (training) or running ones."""
        self._check_input_dim(input)
        synced = (
            self.training and dist.is_available() and dist.is_initialized()
        ) and dist.get_world_size() > 1
        if not synced:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        # Statistics in float64 on the CPU, where torch's own batch norm also accumulates in
        # float64; float32 here moved some gradients by 1% in the two-process test.
        wide = torch.float64 if input.device.type == "cpu" else torch.float32
        values = input.to(torch.promote_types(input.dtype, wide))
        local_count = values.numel() // channels
        # One reduction carries the sums and the row count; the count has no gradient.
        sums = all_reduce_sum(
            torch.cat([values.sum(dims), values.new_tensor([float(local_count)])])
        )
        count = sums[-1].detach()
        mean = sums[:-1] / count  # (C,)
        centred = values - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / count  # (C,) biased
        normalised = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            normalised = normalised * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return normalised.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)  # running_var is unbiased, as in BN
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every batch-norm layer by one synchronised across processes.

    CUDA gets torch's `nn.SyncBatchNorm`; other devices get `GlobalBatchNorm`. Parameters and
    running statistics are carried over, and the state-dict keys do not change, so a
    checkpoint loads into the plain model of a single-process run.
    """
    if device.type == "cuda":
        synced: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call]
        return synced
    return _to_global_batchnorm(module)


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        # The very tensors of the old layer, so an optimiser built before still updates them.
        with torch.no_grad():
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            if module.track_running_stats:
                converted.running_mean = module.running_mean
                converted.running_var = module.running_var
                converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _to_global_batchnorm(child))
    return converted


def contrastive_objective(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    *,
    counts: list[int],
    gather: Gather = gather_rows,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's part of NT-Xent over the global batch.

    Each process's queries are its own two views; the keys are every process's views, so
    the negatives are those of the whole global batch (paper, section 2 and appendix B.1).

    Args:
        z_a: This process's first-view projections, (n, D).
        z_b: Its second-view projections, (n, D).
        temperature: NT-Xent temperature.
        counts: Image pairs held by each process this step.
        gather: How rows are collected from the processes (tests pass broken ones).

    Returns:
        (objective, share): back-propagating `objective` on every process and then averaging
        the gradients over processes gives the gradient of the global loss; the global loss
        is the sum of `share` (detached) over processes. Both are the plain loss with one
        process.
    """
    pairs, offset = gather(torch.stack([z_a, z_b], dim=1), counts)  # (N, 2, D)
    local = nt_xent_loss(
        z_a, z_b, temperature, candidates=(pairs[:, 0], pairs[:, 1]), offset=offset
    )
    # The global loss averages 2N queries; this process holds 2n of them. Gradients are later
    # divided by the world size, hence the factor len(counts).
    share = z_a.shape[0] / sum(counts)
    return local * (share * len(counts)), local.detach() * share
