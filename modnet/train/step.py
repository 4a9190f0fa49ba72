"""One optimisation step, shared by every loop in modnet: train, transfer, adapt, fit.

A step is a loss over shares of the batch (one per micro-batch of this rank),
backward through ``DistributedDataParallel`` when several ranks run, gradient
clipping, the optimizer and the learning-rate schedule. What differs between
loops is given as hooks: the loss of a share (extra terms included), which
parameters train (the optimizer groups) and which BatchNorm statistics train.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .distributed import DistContext, average_statistics, data_parallel
from .schedule import cosine_schedule

# loss(step, share) -> (loss, samples); None as the loss: this share has no samples
ShareLoss = Callable[[int, int], tuple[torch.Tensor | None, int]]


class _Shares(nn.Module):
    """What DistributedDataParallel wraps: the modules that train and the loss of a share."""

    def __init__(self, modules: Sequence[nn.Module], loss: ShareLoss):
        super().__init__()
        self.trained = nn.ModuleList(modules)
        self.loss = loss

    def forward(self, step: int, share: int):
        return self.loss(step, share)


class StepRunner:
    """Runs optimisation steps over ``micro_batches`` shares of each rank's batch.

    Gradients of the shares accumulate (DDP communicates once, after the last);
    a parameter no share of any rank used keeps ``grad=None``, so the optimizer
    leaves it untouched. BatchNorm normalises each share (micro-batch or rank) by
    its own statistics; the running statistics that train move once per step, by
    the mean of the shares' updates, on every rank alike (``num_batches_tracked``
    counts every share). So one process with ``M`` micro-batches computes what
    ``M`` ranks compute, and ranks always hold the same statistics.

    Args:
        modules: What trains (the model, an objective's discriminator); under
            DDP these are wrapped, so ``loss`` must run them.
        loss: ``loss(step, share)`` -> ``(loss, samples)``. Shares are numbered
            ``0..micro_batches - 1``; summed over shares and ranks, the losses
            must be the objective (scale by the global batch, not the share).
        groups: Optimizer parameter groups, each with its own ``lr``.
        total_steps: Steps of the run (the learning-rate schedule's length).
        warmup_steps: Steps of linear learning-rate warm-up.
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov, ``momentum``).
        grad_clip: Clip the global gradient norm to this (None or 0: no clipping).
        ctx: Data-parallel context.
        micro_batches: Shares per rank and step.
        statistics: Returns the running-statistics buffers that train this
            step; they are averaged over micro-batches as described above.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        loss: ShareLoss,
        groups: list[dict[str, Any]],
        total_steps: int,
        warmup_steps: int = 0,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        grad_clip: float | None = None,
        ctx: DistContext | None = None,
        micro_batches: int = 1,
        statistics: Callable[[], list[torch.Tensor]] = list,
    ):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}")
        self.ctx = ctx or DistContext()
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: every parameter is frozen")
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups)
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, momentum=momentum, nesterov=True)
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}: choose adamw or sgd")
        self.lr_schedule = cosine_schedule(self.optimizer, total_steps, warmup_steps)
        self.grad_clip = grad_clip
        self.micro_batches = micro_batches
        self.statistics = statistics
        self.engine = data_parallel(_Shares(modules, loss), self.ctx)
        self._counted: list[torch.Tensor] | None = None  # counters as all shares last agreed

    def run(self, step: int) -> tuple[float, int]:
        """One step: returns this rank's summed loss value and its number of samples."""
        self.lr_schedule.step_update(step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        statistics = self.statistics()
        if self._counted is None:
            self._counted = [b.clone() for b in statistics if not b.is_floating_point()]
        buffers = [b for b in statistics if b.is_floating_point() and self.micro_batches > 1]
        start = [b.detach().clone() for b in buffers]
        updates: list[list[torch.Tensor]] = []
        total, samples = 0.0, 0
        # Share 0 goes last: it is never empty, and under DDP its backward communicates.
        for share in reversed(range(self.micro_batches)):
            local = share > 0 and isinstance(self.engine, nn.parallel.DistributedDataParallel)
            with self.engine.no_sync() if local else contextlib.nullcontext():
                loss, count = self.engine(step, share)
                if loss is None:
                    if share == 0:
                        raise ValueError(f"step {step} gave this rank no samples")
                    continue
                (loss * self.ctx.world_size).backward()  # DDP averages over ranks
            total, samples = total + float(loss.detach()), samples + count
            if buffers:
                updates.append([b.detach().clone() for b in buffers])
                with torch.no_grad():
                    for buffer, value in zip(buffers, start, strict=True):
                        buffer.copy_(value)
        with torch.no_grad():
            for index, buffer in enumerate(buffers):
                values = torch.stack([u[index] for u in updates])
                buffer.copy_(values.mean(0))
        average_statistics(statistics, self.ctx, self._counted)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        return total, samples

    def state_dict(self) -> dict[str, Any]:
        return dict(optimizer=self.optimizer.state_dict(), lr=self.lr_schedule.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if "lr" in state:
            self.lr_schedule.load_state_dict(state["lr"])
