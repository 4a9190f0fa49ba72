"""Batches whose samples belong to different tasks: how they run.

A model called with one task per sample (``ModularNet.forward`` with task ids)
runs the batch in one of three ways (``ModularNet.mixed_batches``):

- ``split``: each task's samples as one sub-batch with that task's own weights;
- ``grouped``: every layer once for the whole batch, each sample's weights
  gathered by its task id (fixed shapes: what runs under ``torch.compile``, see
  ``modnet.grouped``);
- ``chunked`` (the eager default): layer by layer, the tasks a few at a time.
  Mixing every task's weights of every layer up front writes ``T * L`` full
  weight sets (21 MB per task for ``modnet_vit_tiny``, 1.37 GB for 64 tasks) to
  memory and reads them back. Here a chunk of
  tasks with equal sample counts (``CHUNK_BYTES`` of mixed weights, at most
  ``CHUNK_SAMPLES`` samples) has each layer's weights mixed just before its
  samples use them, and runs the grouped block with one matmul per task (without
  autograd, linear layers mix their tasks' weights two at a time inside the
  layer, so the matmul reads them from cache: ``TemplatePool.mix_lazily``); a task
  alone in its chunk (many samples) runs all its layers as in ``split``. When
  tasks share a layer's weights (hard routes on one template), each distinct
  weight set instead runs once for all of its samples (``run_shared_layers``).

Every way gives each sample the result of running its task's samples alone,
within rounding: a batched matmul may round differently from a linear layer (one
bf16 step under autocast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import drop_path as _drop_path
from .features import checkpointed

if TYPE_CHECKING:
    from .model import ModularNet
    from .pool import TemplatePool
    from .routing import RoutePlan

MIXED_BATCHES = ("auto", "chunked", "grouped", "split")


@dataclass(frozen=True)
class TaskGroups:
    """The tasks of a mixed batch: their names and every sample's index among them."""

    names: list[str]
    ids: torch.Tensor


def split(
    model: ModularNet,
    x: torch.Tensor,
    ids: torch.Tensor,
    fn: Callable[[torch.Tensor, str], torch.Tensor],
    pad: bool,
) -> torch.Tensor:
    """``fn(samples, task)`` for each task's samples; outputs back in batch order,
    padded with ``-inf`` to the widest task's classes when ``pad``."""
    names = model.task_names
    counts = torch.bincount(ids, minlength=len(names)).tolist()
    order = torch.argsort(ids, stable=True)
    sizes = [c for c in counts if c]
    present = [names[i] for i, c in enumerate(counts) if c]
    if not sizes:  # an empty batch: the first task's empty output, as wide as any batch's
        sizes, present = [0], names[:1]
    classes = model.task_classes
    if pad:
        headless = [n for n in present if not classes[n]]
        if headless and len(headless) < len(present):
            raise ValueError(
                f"tasks {headless} have no head, so their outputs would be features beside "
                "other tasks' logits: run them in batches of their own, or call "
                "forward_features for all"
            )
    outputs = [fn(chunk, name) for chunk, name in zip(x[order].split(sizes), present, strict=True)]
    if pad:
        width = max(*classes.values(), *(o.shape[-1] for o in outputs))
        outputs = [F.pad(o, (0, width - o.shape[-1]), value=float("-inf")) for o in outputs]
    merged = torch.cat(outputs)
    return merged[torch.argsort(order)]


def features(model: ModularNet, x: torch.Tensor, groups: TaskGroups) -> torch.Tensor:
    """``ModularNet.forward_features`` for a batch of tasks ``groups`` (grouped or
    chunked): in grouped mode every layer runs once for all samples."""
    x = trunk_stage(model, "embed", x, groups)
    if mode(model) == "chunked":
        x = run_layers(model, x, groups.names, groups.ids)
        return trunk_stage(model, "norm", x, groups)
    weights, active = task_weights(model, groups.names)
    stats = stacked_stats(model, groups.names)
    ones = x.new_ones(x.shape[0])
    for layer in range(model.depth):
        # Samples whose (shorter, hard) route skips this layer keep their input.
        weight = ones if active is None else active[:, layer].index_select(0, groups.ids)
        out = _layer(
            model,
            layer,
            model.pool.run_grouped,
            x,
            {name: w[:, layer] for name, w in weights.items()},
            {name: s[:, layer] for name, s in stats.items()},
            groups.ids,
            weight.to(x.dtype),
        )
        x = out if active is None else torch.where(_per_sample(weight, out) > 0, out, x)
    if any(bn.training for bn in model.pool.grouped.batch_norms):
        store_stats(model, groups.names, stats, "layer")
    return trunk_stage(model, "norm", x, groups)


def head(model: ModularNet, x: torch.Tensor, groups: TaskGroups, pre_logits: bool) -> torch.Tensor:
    """Pooling and every sample's task head at once; ``-inf`` beyond a task's classes."""
    x = trunk_stage(model, "pre_logits", x, groups)
    if pre_logits:
        return x
    heads = [model.heads[name] for name in groups.names]
    width = max(model.task_classes.values())
    weight = torch.stack([F.pad(h.weight, (0, 0, 0, width - h.out_features)) for h in heads])
    bias = torch.stack(
        [F.pad(h.bias, (0, width - h.out_features), value=float("-inf")) for h in heads]
    )
    ids = groups.ids
    sample_weight = weight.index_select(0, ids).transpose(1, 2)
    out = torch.baddbmm(bias.index_select(0, ids).unsqueeze(1), x.unsqueeze(1), sample_weight)
    return out.squeeze(1)


def trunk_stage(model: ModularNet, stage: str, x: torch.Tensor, groups: TaskGroups):
    """A trunk stage for the whole batch, BatchNorm with each task's statistics."""
    if not model._trunk_binder.names:
        return model.trunk(x, stage)
    runner = model._current_grouped_trunk()
    stats = {
        name: torch.stack([model.norm_stats[t].trunk()[name] for t in groups.names])
        for name in model._trunk_binder.names
    }
    tensors = {**dict(model.trunk.named_parameters()), **dict(model.trunk.named_buffers())}
    tensors.update(stats)
    out = runner(tensors, groups.ids, x.new_ones(x.shape[0]), x, stage)
    if any(bn.training for bn in runner.batch_norms):
        store_stats(model, groups.names, stats, "trunk")
    return out


def mode(model: ModularNet) -> str:
    """How this mixed-task batch runs: ``"split"``, ``"grouped"`` or ``"chunked"``.

    ``mixed_batches``: ``"auto"`` (fixed shapes under ``torch.compile``, where
    splitting by task would break the graph and recompile for every new mix; in
    eager mode chunks of tasks, the fastest of the three on one CPU core in
    ``bench/test_mixed_batches.py``), or one of the three. Blocks, trunks or heads
    without grouped versions run task by task (``"split"``); under
    ``torch.compile`` ``"chunked"`` runs ``"grouped"``.

    Raises:
        ValueError: An unknown ``mixed_batches``.
    """
    chosen = model.mixed_batches
    if chosen not in MIXED_BATCHES:
        raise ValueError(f"unknown mixed_batches {chosen!r}: choose one of {MIXED_BATCHES}")
    if chosen == "split" or not runs_grouped(model):
        return "split"
    if torch.compiler.is_compiling() or chosen == "grouped":
        return "grouped"
    return "chunked"


def runs_grouped(model: ModularNet) -> bool:
    """Whether mixed-task batches can run with fixed shapes (see ``modnet.grouped``)."""
    heads = all(isinstance(h, nn.Linear) for h in model.heads.values())
    trunk = not model._trunk_binder.names or model._current_grouped_trunk() is not None
    return heads and trunk and model.pool.grouped is not None


def task_weights(model: ModularNet, names: list[str]):
    """Every task's layer weights, ``{tensor: [T, L, *shape]}``, from one mix.

    Also returns ``[T, L]`` with 1 where the task's route runs the layer (``None``
    when all do); see ``task_coefficients``.
    """
    coefficients, active = task_coefficients(model, names)
    mixed = model.pool.mix(coefficients.flatten(0, 1))
    weights = {n: w.unflatten(0, coefficients.shape[:2]) for n, w in mixed.items()}
    return weights, active


def task_coefficients(model: ModularNet, names: list[str]):
    """Every task's mixing coefficients ``[T, L, K, num_tensors]``.

    Hard routes mix with one-hot coefficients (exactly their templates), routes
    made before the pool grew with zeros for the newer templates. Also returns
    ``[T, L]`` with 1 where the task's route runs the layer (``None`` when all do).
    """
    count, depth = model.pool.num_templates, model.depth
    groups = model.pool.num_tensors
    coefficients, active = [], []
    for name in names:
        plan: RoutePlan = model.routes[name].plan(model.hypernet)
        if plan.coefficients is not None:
            c = plan.coefficients
        else:
            index = plan.template_indices(model._reference_tensor().device)
            c = F.one_hot(index, count).to(model._reference_tensor().dtype)
        c = c if c.ndim == 3 else c.unsqueeze(-1).expand(*c.shape, groups)
        active.append(c.shape[0])
        pad = (0, 0, 0, count - c.shape[1], 0, depth - c.shape[0])
        coefficients.append(F.pad(c.to(model._reference_tensor().dtype), pad))
    stacked = torch.stack(coefficients)
    if all(a == depth for a in active):
        return stacked, None
    runs = torch.tensor([[layer < a for layer in range(depth)] for a in active])
    return stacked, runs.to(device=stacked.device, dtype=stacked.dtype)


@torch.no_grad()
def store_stats(
    model: ModularNet, names: list[str], stats: dict[str, torch.Tensor], part: str
) -> None:
    for index, name in enumerate(names):
        task_stats = model.norm_stats[name]
        for key, value in stats.items():
            target = task_stats.layer_stack(key) if part == "layer" else task_stats.trunk()[key]
            target.copy_(value[index])


def task_groups(model: ModularNet, ids: torch.Tensor) -> TaskGroups:
    """The batch's tasks: all of them under ``torch.compile``, the present ones in eager."""
    names = model.task_names
    if torch.compiler.is_compiling():
        # Every task takes part: no shape depends on which tasks are in the batch.
        return TaskGroups(names, ids)
    # Eager: only the tasks present, so absent tasks' parameters get no gradient.
    present = torch.unique(ids)
    local = torch.full((len(names),), -1, dtype=torch.long, device=ids.device)
    local[present] = torch.arange(present.numel(), device=ids.device)
    return TaskGroups([names[i] for i in present.tolist()], local[ids])


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
    grouped = [(i, c) for i, c in enumerate(chunks) if len(c.tasks) > 1]
    if grouped:  # tasks that would run one small kernel each: do they share weights?
        coefficients, active = task_coefficients(model, names)
        sets = weight_sets(coefficients, active)
        if sets is not None:
            return run_shared_layers(model, x, names, ids, sets)
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
    if grouped:
        runs = None if active is None else active.bool().tolist()
        parts = {i: x[c.start : c.stop] for i, c in grouped}
        # per chunk, once: its tasks' rows of the coefficients, every sample's task and
        # its tasks' statistics of every layer, [tasks, depth, ...]
        index = {
            i: (
                torch.tensor(c.tasks, device=coefficients.device),
                torch.arange(len(c.tasks), device=x.device).repeat_interleave(c.size),
            )
            for i, c in grouped
        }
        stats = {i: stacked_stats(model, [names[t] for t in c.tasks]) for i, c in grouped}
        for layer in range(model.depth):
            for i, c in grouped:
                layer_stats = {name: s[:, layer] for name, s in stats[i].items()}
                parts[i] = _run_grouped(
                    model, parts[i], layer, c, layer_stats, coefficients, runs, *index[i]
                )
        if any(bn.training for bn in model.pool.grouped.batch_norms):
            for i, c in grouped:  # the running statistics moved in the stacks
                store_stats(model, [names[t] for t in c.tasks], stats[i], "layer")
        outputs.update(parts)
    x = torch.cat([outputs[i] for i in range(len(chunks))])
    return x[torch.argsort(order)]


def weight_sets(
    coefficients: torch.Tensor, active: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every layer's distinct weight sets among a batch's tasks, when tasks share them.

    Tasks with equal coefficients at a layer (hard routes on the same template,
    routes made from the same one and not trained since) run it with the same
    weights, so their samples can run it as one batch: one kernel for all of
    them, as in a single-task batch, instead of one per task.

    Args:
        coefficients: ``[T, L, K, G]`` from ``task_coefficients``.
        active: ``[T, L]``, 1 where the task's route runs the layer, or ``None``.

    Returns:
        Per layer, the distinct coefficient rows ``[U, K, G]`` and every task's index
        among them ``[T]`` (-1 where its route skips the layer). ``None`` for all
        layers (the choice is the whole batch's) when the coefficients require grad
        (a trainable soft route while autograd records, in training or eval mode: a
        shared row would send one task's gradient to another task's route), when
        there is one task, or when tasks share too little to gain: fewer than two
        tasks per weight set, on average over the layers.
    """
    tasks, depth = coefficients.shape[:2]
    if coefficients.requires_grad or tasks < 2:
        return None
    runs = coefficients.new_ones(tasks, depth, dtype=torch.bool) if active is None else active > 0
    sets, distinct = [], 0
    for layer in range(depth):
        run = runs[:, layer]
        used = coefficients[run, layer].flatten(1)
        rows, inverse = torch.unique(used, dim=0, return_inverse=True)
        which = torch.full((tasks,), -1, dtype=torch.long, device=coefficients.device)
        which[run] = inverse
        sets.append((rows.view(-1, *coefficients.shape[2:]), which))
        distinct += rows.shape[0]
    return sets if 2 * distinct <= int(runs.sum()) else None


def run_shared_layers(
    model: ModularNet,
    x: torch.Tensor,
    names: list[str],
    ids: torch.Tensor,
    sets: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Every routed layer, each distinct weight set once for all samples using it.

    Per layer the batch is ordered by weight set (samples whose route skips the
    layer first, kept as they are) and each set runs ``TemplatePool.run_shared``
    on its samples, BatchNorm with each sample's task statistics.

    Args:
        model: The model whose pool, norm statistics and drop-path rates are used.
        x: The trunk's embedding of the batch ``[B, ...]``.
        names: The tasks in the batch.
        ids: Every sample's index into ``names``, ``[B]``.
        sets: ``weight_sets`` of the batch's tasks.

    Returns:
        The last layer's output ``[B, ...]`` in the order of ``x``.
    """
    pool = model.pool
    stats = stacked_stats(model, names)
    order = torch.arange(x.shape[0], device=x.device)  # x's rows are the batch's in this order
    for layer, (rows, which) in enumerate(sets):
        key = which.to(ids.device)[ids[order]]
        local = torch.argsort(key, stable=True)
        order, x = order[local], x[local]
        counts = torch.bincount(key + 1, minlength=rows.shape[0] + 1).tolist()
        weights = pool.mix(rows)
        layer_stats = {name: s[:, layer] for name, s in stats.items()}
        parts, sample_ids = list(x.split(counts)), ids[order].split(counts)
        for u in range(rows.shape[0]):
            if counts[u + 1]:
                tensors = {name: w[u] for name, w in weights.items()}
                part, part_ids = parts[u + 1], sample_ids[u + 1]
                parts[u + 1] = _layer(
                    model, layer, pool.run_shared, part, tensors, layer_stats, part_ids
                )
        # (an empty part would give the result its own layout, e.g. NCHW)
        x = torch.cat([p for p in parts if p.shape[0]])
    if any(bn.training for bn in pool.grouped.batch_norms):
        store_stats(model, names, stats, "layer")
    return x[torch.argsort(order)]


def _run_grouped(model, rows, layer, chunk, stats, coefficients, runs, tasks, ids) -> torch.Tensor:
    """The tasks of the chunk at once, with one matmul per task in linear layers.

    ``tasks`` indexes the chunk's tasks in ``coefficients``; ``ids`` is every row's
    index among them; ``stats`` holds their statistics of this layer, ``[tasks, ...]``
    (moved in place in training mode)."""
    pool = model.pool
    if runs is None:
        weight = rows.new_ones(rows.shape[0])
    else:
        run = torch.tensor([float(runs[t][layer]) for t in chunk.tasks], device=rows.device)
        weight = run.to(rows.dtype).repeat_interleave(chunk.size)

    def mixed_run(x, inputs, stats):
        # Mixed here, so that a checkpointed layer keeps its coefficients, not its
        # tasks' mixed weights (1.37 GB for 64 ViT-tiny tasks), and mixes again.
        weights, mix = chunk_weights(pool, inputs["coefficients"])
        return pool.run_grouped(x, weights, stats, ids, weight, chunk.size, mix)

    inputs = {"coefficients": coefficients[tasks, layer]}
    out = _layer(model, layer, mixed_run, rows, inputs, stats)
    return out if runs is None else torch.where(_per_sample(weight, out) > 0, out, rows)


def chunk_weights(pool: TemplatePool, coefficients: torch.Tensor):
    """A chunk's weights of one layer from its tasks' coefficients ``[T, K, ...]``,
    and the ``mix`` argument of ``TemplatePool.run_grouped``.

    Without autograd (``torch.no_grad``, ``torch.inference_mode``), linear layers
    mix their weights just before use (``TemplatePool.mix_lazily``). With it, the
    backward pass through many small mixes made a 64-task ViT-tiny training step
    8 % slower than mixing up front (one interleaved measurement, 0.51 against
    0.56 of a single-task step), so everything is mixed here; so too with folded
    BatchNorm, which folds mixed weights.
    """
    if pool.folding() is None and not torch.is_grad_enabled():
        return pool.mix_lazily(coefficients)
    return pool.mix(coefficients), None


def stacked_stats(model: ModularNet, names: list[str]) -> dict[str, torch.Tensor]:
    """The tasks' BatchNorm statistics of every layer, ``{name: [T, L, ...]}``."""
    return {
        name: torch.stack([model.norm_stats[t].layer_stack(name) for t in names])
        for name in model.pool.stat_names
    }


def _layer(model: ModularNet, layer: int, run, x, weights, stats, *args) -> torch.Tensor:
    """``run(x, weights, stats, *args)`` at layer position ``layer``, as a task run
    alone runs it (``ModularNet._run_layer``): drop path at the position's rate,
    activation checkpointing when the model checkpoints its layers."""

    def call(x, weights, stats):
        return run(x, weights, stats, *args)

    if model._grouped_drop_paths:
        rate = model.drop_path_rates[layer]
        call = _drop_path.at_rate(call, model._grouped_drop_paths, rate)
    if model.grad_checkpointing and torch.is_grad_enabled():
        return checkpointed(call, x, weights, stats)
    return call(x, weights, stats)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` values as ``[B, 1, ...]``, broadcastable against ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))
