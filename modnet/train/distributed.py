"""Data parallelism under ``torchrun``: gloo on CPU, nccl on GPU.

Gradients are all-reduced explicitly after each backward, with zeros for
parameters a rank's batch did not reach (another task's route, say). This is
the arithmetic of DistributedDataParallel without its requirement that every
trainable parameter receives a gradient on every rank, which multi-task batches
and alternating tasks break.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

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


def all_reduce_gradients(params: list[nn.Parameter], ctx: DistContext) -> None:
    """Sums gradients over ranks (each rank's loss is already scaled by the global batch)."""
    if not ctx.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for param, reduced in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
        param.grad = reduced


def average_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Averages floating-point buffers (BatchNorm running statistics) over ranks."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(ctx.world_size)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
