"""Data parallelism under ``torchrun``: gloo on CPU, nccl on GPU.

Training steps run through ``torch.nn.parallel.DistributedDataParallel``
(bucketed all-reduce overlapped with the backward pass). Multi-task batches and
alternating tasks leave parameters unused on some ranks, so it runs with
``find_unused_parameters``: a parameter that no rank used keeps ``grad=None``,
and the optimizer leaves it alone exactly as a single process does (no weight
decay, no momentum). After each step, ``average_statistics`` averages the
BatchNorm running statistics of the tasks that trained (and only those) over
the ranks: a small all-reduce that keeps every rank's statistics the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ..errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Joins the process group that ``torchrun`` describes, if any."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but CUDA is not available here")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistContext(rank=rank, world_size=world_size, device=target)


def broadcast_state(model: nn.Module, ctx: DistContext) -> None:
    """Makes every rank start from rank 0's parameters and buffers."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def data_parallel(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` under DistributedDataParallel when several ranks run, else itself.

    Buffers are not broadcast at each forward (each task keeps its own BatchNorm
    statistics per rank until ``average_statistics``); parameters that some rank
    did not use are found at each step, and those no rank used keep ``grad=None``.
    DDP averages gradients over ranks: a rank's loss must be scaled accordingly.
    """
    if not ctx.enabled:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False
    )


def all_reduce_gradients(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Sums gradients over ranks by hand, for loops that do not run through DDP.

    A parameter that some rank did not reach counts as zero there; one that no
    rank reached keeps ``grad=None`` (a used-mask is reduced alongside), so an
    optimizer skips it as it would in one process.
    """
    if not ctx.enabled or not params:
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors([*grads, used.to(grads[0].device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    *reduced, used = _unflatten_dense_tensors(flat, [*grads, used])
    for param, grad, anywhere in zip(params, reduced, used.tolist(), strict=True):
        param.grad = grad if anywhere else None


def average_statistics(
    buffers: list[torch.Tensor], ctx: DistContext, counted: list[torch.Tensor] | None = None
) -> None:
    """Averages running statistics over ranks in place; integer counters add up.

    Args:
        buffers: The statistics that trained (only these: averaging values that
            did not change could still move them by rounding).
        counted: The integer counters (``num_batches_tracked``) among ``buffers``
            as they were at the last synchronisation; each rank's increase since
            then is summed, so a counter counts the batch shares every rank saw.
            Updated in place. Without it, counters take their maximum.
    """
    if not ctx.enabled or not buffers:
        return
    with torch.no_grad():
        floats = [b for b in buffers if b.is_floating_point()]
        counters = [b for b in buffers if not b.is_floating_point()]
        if counted is None:
            for counter in counters:
                dist.all_reduce(counter, op=dist.ReduceOp.MAX)
            counters = []
        # One all-reduce: the statistics, then each counter's increase (small, exact in fp32).
        counted = counted if counters else []
        increases = [c - base for c, base in zip(counters, counted, strict=True)]
        parts = [t.reshape(-1).float() for t in [*floats, *increases]]
        if not parts:
            return
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        values = flat.split([p.numel() for p in parts])
        for buffer, value in zip(floats, values, strict=False):
            buffer.copy_(value.view_as(buffer) / ctx.world_size)
        for counter, base, value in zip(counters, counted, values[len(floats) :], strict=True):
            counter.copy_(base + value.view_as(counter).round().to(counter.dtype))
            base.copy_(counter)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
