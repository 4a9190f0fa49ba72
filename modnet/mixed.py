"""The routed layers of a mixed-task batch in eager mode, in chunks of tasks that fit the caches.

Mixing every task's weights of every layer up front writes ``T * L`` full weight
sets (21 MB per task for ``modnet_vit_tiny``) to memory and reads them back: for
64 tasks that costs more than the batch's matmuls. Here layers run one after the
other for the whole batch; within a layer the tasks are taken a few at a time
(``CHUNK_BYTES`` of mixed weights, ``CHUNK_SAMPLES`` samples), and a chunk's
weights are mixed just before its samples use them, while they are still in the
cache. A chunk of one task runs the plain block; a chunk of several tasks with the
same number of samples runs the grouped block (``modnet.grouped``) with one matmul
per task. The result equals running each task's samples alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import drop_path as _drop_path

if TYPE_CHECKING:
    from .model import ModularNet

# Mixed weights of one chunk (bytes) and its samples: measured on one CPU core by
# ``bench/test_mixed_batches.py`` (the L3 cache holds a chunk and its layer's templates).
CHUNK_BYTES = 32 * 2**20
CHUNK_SAMPLES = 16


@dataclass(frozen=True)
class Chunk:
    """Tasks ``tasks`` (indices among the batch's tasks), ``size`` samples each, at
    rows ``[start, start + len(tasks) * size)`` of the batch sorted by chunk."""

    tasks: list[int]
    size: int
    start: int

    @property
    def stop(self) -> int:
        return self.start + len(self.tasks) * self.size


def plan_chunks(counts: list[int], layer_bytes: int) -> list[Chunk]:
    """Chunks of tasks with equal sample counts, each at most ``CHUNK_BYTES`` of mixed
    weights and ``CHUNK_SAMPLES`` samples (at least one task)."""
    order = sorted((c, t) for t, c in enumerate(counts) if c)
    chunks: list[Chunk] = []
    start, i = 0, 0
    while i < len(order):
        size = order[i][0]
        most = max(1, min(CHUNK_BYTES // max(layer_bytes, 1), CHUNK_SAMPLES // size))
        tasks = [order[i][1]]
        i += 1
        while i < len(order) and order[i][0] == size and len(tasks) < most:
            tasks.append(order[i][1])
            i += 1
        chunks.append(Chunk(tasks, size, start))
        start += len(tasks) * size
    return chunks


def run_layers(model: ModularNet, x: torch.Tensor, names: list[str], ids: torch.Tensor):
    """Every routed layer for a batch whose samples belong to tasks ``names[ids]``.

    Args:
        model: The model whose pool, routes and norm statistics are used.
        x: The trunk's embedding of the batch ``[B, ...]``.
        names: The tasks in the batch.
        ids: Every sample's index into ``names``, ``[B]``.

    Returns:
        The last layer's output ``[B, ...]`` in the order of ``x``.
    """
    pool = model.pool
    counts = torch.bincount(ids, minlength=len(names)).tolist()
    chunks = plan_chunks(counts, pool.template_numel * x.element_size())
    rank = torch.empty(len(names), dtype=torch.long)
    rank[[t for c in chunks for t in c.tasks]] = torch.arange(len(names))
    order = torch.argsort(rank.to(ids.device)[ids], stable=True)
    x = x[order]
    # A task alone in its chunk runs all its layers at once, as in a single-task batch.
    outputs = {
        i: model._routed_layers(x[c.start : c.stop], names[c.tasks[0]])
        for i, c in enumerate(chunks)
        if len(c.tasks) == 1
    }
    grouped = [(i, c) for i, c in enumerate(chunks) if len(c.tasks) > 1]
    if grouped:
        coefficients, active = model._task_coefficients(names)
        runs = None if active is None else active.bool().tolist()
        parts = {i: x[c.start : c.stop] for i, c in grouped}
        for layer in range(model.depth):
            for i, c in grouped:
                parts[i] = _run_grouped(model, parts[i], layer, c, names, coefficients, runs)
        outputs.update(parts)
    x = torch.cat([outputs[i] for i in range(len(chunks))])
    return x[torch.argsort(order)]


def _run_grouped(model, rows, layer, chunk, names, coefficients, runs) -> torch.Tensor:
    """The tasks of the chunk at once, with one matmul per task in linear layers."""
    pool = model.pool
    tasks = torch.tensor(chunk.tasks, device=coefficients.device)
    weights = pool.mix(coefficients[tasks, layer])
    stats = {
        name: torch.stack([model.norm_stats[names[t]].layer_stack(name)[layer] for t in chunk.tasks])
        for name in pool.stat_names
    }
    ids = torch.arange(len(chunk.tasks), device=rows.device).repeat_interleave(chunk.size)
    if runs is None:
        weight = rows.new_ones(rows.shape[0])
    else:
        run = torch.tensor([float(runs[t][layer]) for t in chunk.tasks], device=rows.device)
        weight = run.to(rows.dtype).repeat_interleave(chunk.size)
    run_grouped = pool.run_grouped
    if model._grouped_drop_paths:
        rate = model.drop_path_rates[layer]
        run_grouped = _drop_path.at_rate(run_grouped, model._grouped_drop_paths, rate)
    out = run_grouped(rows, weights, stats, ids, weight, group_size=chunk.size)
    if stats and any(bn.training for bn in pool.grouped.batch_norms):
        with torch.no_grad():
            for i, t in enumerate(chunk.tasks):
                for name, value in stats.items():
                    model.norm_stats[names[t]].layer_stack(name)[layer].copy_(value[i])
    if runs is None:
        return out
    keep = weight.view(-1, *([1] * (out.dim() - 1))) > 0
    return torch.where(keep, out, rows)
