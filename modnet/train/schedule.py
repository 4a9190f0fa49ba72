"""Which samples of which task form each step's batch, as a pure function of the step.

No sampler state exists: a resumed run recomputes exactly the batches it would
have seen, and every data-parallel rank takes its own slice of the same batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from timm.scheduler import CosineLRScheduler

MIXING_MODES = ("mixed", "alternate")


class MultiTaskSchedule:
    """Batches over several tasks' training sets.

    Args:
        sizes: Training-set size of every task, in task order.
        batch_size: Global batch size (summed over data-parallel ranks).
        mode: ``"mixed"``: each batch is a slice of one shuffled pass over all
            tasks' samples together, so tasks mix within a batch in proportion to
            their sizes. ``"alternate"``: each step draws a whole batch from one
            task, cycling through the tasks.
        seed: Seed of the shuffles.
    """

    def __init__(self, sizes: Sequence[int], batch_size: int, mode: str = "mixed", seed: int = 0):
        if mode not in MIXING_MODES:
            raise ValueError(f"unknown mixing mode {mode!r}: choose one of {MIXING_MODES}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every task needs training samples, got sizes {list(sizes)}")
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.offsets = torch.tensor([0, *self.sizes]).cumsum(0)
        self.steps_per_epoch = math.ceil(sum(self.sizes) / batch_size)
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def smallest_batch(self) -> int:
        """The fewest samples a step's (global) batch can hold: the last of a mixed epoch."""
        if self.mode == "mixed":
            return int(self.offsets[-1]) - (self.steps_per_epoch - 1) * self.batch_size
        return self.batch_size

    def _permutation(self, stream: int, epoch: int, size: int) -> torch.Tensor:
        key = (stream, epoch)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + stream * 7919 + epoch)
            self._cache[key] = torch.randperm(size, generator=generator)
        return self._cache[key]

    def batch(
        self, step: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[int, torch.Tensor]]:
        """``(task index, sample indices)`` pairs of this rank's share of step ``step``.

        Samples are grouped by task, tasks in increasing order.
        """
        if self.mode == "mixed":
            epoch, position = divmod(step, self.steps_per_epoch)
            order = self._permutation(-1, epoch, int(self.offsets[-1]))
            chosen = order[position * self.batch_size : (position + 1) * self.batch_size]
            chosen = chosen[rank::world_size].contiguous()
            task_of = torch.searchsorted(self.offsets, chosen, right=True) - 1
            pairs = []
            for task in task_of.unique().tolist():
                picked = chosen[task_of == task]
                pairs.append((task, picked - self.offsets[task]))
            return pairs
        task = step % len(self.sizes)
        size = self.sizes[task]
        start = (step // len(self.sizes)) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs, within = positions // size, positions % size
        picked = torch.stack(
            [
                self._permutation(task, int(e), size)[int(i)]
                for e, i in zip(epochs, within, strict=True)
            ]
        )
        return [(task, picked[rank::world_size])]


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> CosineLRScheduler:
    """Linear warm-up, then cosine decay toward zero: timm's ``CosineLRScheduler``, per update.

    Every parameter group follows its own peak learning rate (its ``lr`` when the
    schedule is made). Set the rate of step ``s`` (counted from 0) with
    ``schedule.step_update(s + 1)``: warm-up reaches the peak at step
    ``warmup_steps - 1``, and the last step still has a small positive rate.
    The schedule is a function of the step; its ``state_dict`` resumes it.

    Args:
        optimizer: The optimizer whose groups' ``lr`` are set.
        total_steps: Steps of the whole run.
        warmup_steps: Steps of linear warm-up from 0 (0: start at the peak).
    """
    warmup = max(1, warmup_steps)
    # A run of a step or two has nothing to anneal; timm logs that, and it is expected.
    logger = logging.getLogger(CosineLRScheduler.__module__)
    expected = _Without("will have no effect on the learning rate")
    logger.addFilter(expected)
    try:
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - warmup + 1),
            lr_min=0.0,
            warmup_t=warmup,
            warmup_lr_init=0.0,
            warmup_prefix=True,
            t_in_epochs=False,
        )
    finally:
        logger.removeFilter(expected)


class _Without(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
