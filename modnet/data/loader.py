"""Batches for training and evaluation, from memory or through a DataLoader.

Training batches are a pure function of the step: a schedule (anything with
``batch(step, rank, world_size) -> [(task index, sample indices), ...]``, such
as ``modnet.train.MultiTaskSchedule``) says which samples of which task form
each rank's share of a step, and ``TrainBatches`` turns them into model input.

- Tasks held in memory (uint8 tensors) are indexed directly: a copy of bytes.
- When some task's images stay on disk (``ImageFiles``), the schedule becomes
  the batch sampler of a ``torch.utils.data.DataLoader`` whose workers decode,
  resize and augment the images, with pinned memory on CUDA; the images a
  worker has not been asked for are never read, so memory does not grow with
  the dataset.

Both paths give the same batch for the same step, augmentation included
(``modnet.data.augment``: one seed per sample from run seed, step, share of
the step (rank, or micro-batch of a rank) and position), so a resumed run is
bit-identical and ranks never share samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from .augment import augment_images, build_augmentation, sample_seed
from .task_data import TaskData

Key = tuple[int, int, int, int, int]  # (step, shard, task index, sample index, position)


class Schedule(Protocol):
    def batch(
        self, step: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[int, torch.Tensor]]: ...


def default_workers() -> int:
    """Loader worker processes when none are asked for: the cores but one, at most 4."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class StepSampler(Sampler[list[Key]]):
    """A schedule as a DataLoader batch sampler: step ``start`` onwards, without end.

    Each yielded batch is the list of ``(step, shard, task, index, position)`` keys of
    one share of a step (``shard`` of ``shards``, e.g. a rank's), in the
    schedule's order; steps where the share is empty are skipped.
    """

    def __init__(self, schedule: Schedule, start: int, shard: int = 0, shards: int = 1):
        self.schedule, self.start, self.shard, self.shards = schedule, start, shard, shards

    def __iter__(self) -> Iterator[list[Key]]:
        step = self.start
        while True:
            keys = step_keys(self.schedule, step, self.shard, self.shards)
            if keys:
                yield keys
            step += 1


def step_keys(schedule: Schedule, step: int, shard: int = 0, shards: int = 1) -> list[Key]:
    """The ``(step, shard, task, index, position)`` keys of one share of ``step``."""
    keys: list[Key] = []
    for task, indices in schedule.batch(step, shard, shards):
        start = len(keys)
        keys += [(step, shard, task, int(i), start + n) for n, i in enumerate(indices.tolist())]
    return keys


class StepSamples(Dataset):
    """One training sample per key: the image (decoded, augmented), its label and task."""

    def __init__(self, tasks: Sequence[TaskData], seed: int):
        self.tasks = list(tasks)
        self.transforms = [build_augmentation(task.transform) for task in self.tasks]
        self.seed = seed

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, int, int, int]:
        step, shard, task_index, index, position = key
        task = self.tasks[task_index]
        image = task.train_x[index]
        transform = self.transforms[task_index]
        if transform is not None:
            seed = sample_seed(self.seed, step, shard, position)
            image = augment_images(image[None], transform, [seed])[0]
        return image, int(task.train_y[index]), task_index, step

    def __len__(self) -> int:
        return sum(len(task.train_y) for task in self.tasks)


class TrainBatches:
    """The training batch of any step: normalised images, labels and task indices.

    Args:
        data: The tasks, in the schedule's task order.
        schedule: Which samples form each step (see the module docstring).
        rank: This process's data-parallel rank.
        world_size: Number of ranks.
        seed: Run seed: with step, share and position it seeds each sample's augmentation.
        workers: DataLoader worker processes when some task is on disk (default
            ``default_workers()``; 0 reads in this process).
        device: Where batches go; on CUDA the loader pins memory.

    Calling it with a step returns ``(x, y, task)``: float32 [B, C, H, W] input
    normalised per task, int64 [B] labels, int64 [B] indices into ``data``,
    samples grouped by task in increasing task order. Tasks whose transform
    record has an ``augment`` entry are augmented (training only).
    """

    def __init__(
        self,
        data: Mapping[str, TaskData] | Sequence[TaskData],
        schedule: Schedule,
        rank: int = 0,
        world_size: int = 1,
        *,
        seed: int = 0,
        workers: int | None = None,
        device: torch.device | str = "cpu",
    ):
        self.tasks = list(data.values()) if isinstance(data, Mapping) else list(data)
        self.schedule, self.rank, self.world_size, self.seed = schedule, rank, world_size, seed
        self.device = torch.device(device)
        self.workers = default_workers() if workers is None else workers
        self.samples = StepSamples(self.tasks, seed)
        self.in_memory = all(task.in_memory for task in self.tasks)
        self._iterators: dict[tuple[int, int], Iterator[Any]] = {}
        self._next_step: dict[tuple[int, int], int] = {}

    def __call__(
        self, step: int, shard: int | None = None, shards: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch of ``step``: this rank's share, or share ``shard`` of ``shards``.

        A share is what ``schedule.batch(step, shard, shards)`` picks (e.g. one
        micro-batch of one rank); an empty share gives empty tensors.
        """
        shard = self.rank if shard is None else shard
        shards = self.world_size if shards is None else shards
        pairs = self.schedule.batch(step, shard, shards)
        if not sum(len(indices) for _, indices in pairs):
            empty = torch.empty(0, dtype=torch.long, device=self.device)
            return torch.empty(0, device=self.device), empty, empty
        if self.in_memory:
            return self._from_memory(step, shard, pairs)
        return self._from_loader(step, shard, shards)

    def _from_memory(
        self, step: int, shard: int, pairs: list[tuple[int, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys, ids, position = [], [], [], 0
        for task_index, indices in pairs:
            task = self.tasks[task_index]
            x = task.train_x[indices]
            transform = self.samples.transforms[task_index]
            if transform is not None:
                seeds = [
                    sample_seed(self.seed, step, shard, position + n) for n in range(len(indices))
                ]
                x = augment_images(x, transform, seeds)
            position += len(indices)
            xs.append(task.normalize(x))
            ys.append(task.train_y[indices])
            ids.append(torch.full((len(indices),), task_index, dtype=torch.long))
        device = self.device
        return torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(ids).to(device)

    def _from_loader(
        self, step: int, shard: int, shards: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (shard, shards)
        if key not in self._iterators or step != self._next_step.get(key):
            self._iterators[key] = iter(self._loader(step, shard, shards))
        x, y, ids, steps = next(self._iterators[key])
        self._next_step[key] = step + 1
        if not bool((steps == step).all()):  # the sampler and the caller disagree: a bug
            raise RuntimeError(f"the loader returned step {int(steps[0])} for step {step}")
        pinned = self.device.type == "cuda"
        x = x.to(self.device, non_blocking=pinned)
        y = y.to(self.device, non_blocking=pinned)
        ids = ids.to(self.device, non_blocking=pinned)
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        for task_index in ids.unique().tolist():
            rows = ids == task_index
            out[rows] = self.tasks[task_index].normalize(x[rows])
        return out, y, ids

    def _loader(self, start: int, shard: int, shards: int) -> DataLoader:
        return DataLoader(
            self.samples,
            batch_sampler=StepSampler(self.schedule, start, shard, shards),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if self.workers else None,
            generator=_own_generator(self.seed),
        )

    def close(self) -> None:
        """Stops the loaders' workers (they start again at the next call)."""
        self._iterators.clear()


def eval_batches(
    task: TaskData,
    batch_size: int,
    workers: int | None = None,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The test split in order, as uint8 [b, C, H, W] images and int64 [b] labels.

    In-memory splits are sliced; a split on disk is decoded by a DataLoader
    with ``workers`` processes (default ``default_workers()``), pinned on CUDA.
    ``shard`` ``(rank, world_size)`` keeps batches ``rank, rank + world_size, ...``:
    ranks get disjoint batches that together are the split (a split on disk is
    still decoded whole by every rank; the forward passes are what is shared).
    """
    starts = shard_starts(len(task.test_y), batch_size, shard)
    if torch.is_tensor(task.test_x):
        for start in starts:
            yield task.test_x[start : start + batch_size], task.test_y[start : start + batch_size]
        return
    workers = default_workers() if workers is None else workers
    loader = DataLoader(
        task.test_x,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        generator=_own_generator(0),
    )
    start = 0
    for x in loader:
        if start in starts:
            yield x, task.test_y[start : start + len(x)]
        start += len(x)


def shard_starts(total: int, batch_size: int, shard: tuple[int, int] = (0, 1)) -> range:
    """First indices of the test batches rank ``shard[0]`` of ``shard[1]`` scores
    (``eval_batches``): every ``world_size``-th batch from the rank's own.

    Raises:
        ConfigError: ``shard`` is not ``(rank, world_size)`` with ``0 <= rank <
            world_size``.
    """
    rank, world_size = shard
    if not 0 <= rank < world_size:
        raise ConfigError(
            f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}"
        )
    return range(rank * batch_size, total, world_size * batch_size)


def _own_generator(seed: int) -> torch.Generator:
    """A generator for a DataLoader's worker seeds, so that starting its iterator
    leaves the global RNG alone: without one, every new iterator draws from it, and
    drop path (which does draw from it) would differ between a resumed run, whose
    iterator starts mid-way, an uninterrupted one, and one with its data in memory.
    The seeds themselves are unused: augmentation is seeded per sample."""
    return torch.Generator().manual_seed(seed)
