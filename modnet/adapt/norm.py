"""Re-estimating one task's BatchNorm statistics on its own images (AdaBN, Li et al. 2016).

The simplest adaptation baseline, and the start of every ``--train ...,norm``
run: the target's statistics are recomputed from unlabelled target images
while every weight stays as it is. The estimate is a cumulative average over
the batches (BatchNorm with ``momentum=None``), not an exponential one, so one
pass gives the statistics of the whole pass, independent of its length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import TaskData
from ..model import ModularNet
from .errors import AdaptationError
from .objectives import objective_names


def batchnorm_modules(model: ModularNet) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm the model runs: the trunk's and the pool's block skeleton's."""
    modules = [*model.trunk.modules(), *model.pool._binder.module.modules()]
    return [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _means_and_vars(model: ModularNet, task: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    state = model.norm_stats[task].state_dict(keep_vars=True)
    return [
        (state[key[: -len("var")] + "mean"], value)
        for key, value in state.items()
        if key.endswith("running_var")
    ]


@torch.no_grad()
def reestimate_norm_stats(
    model: ModularNet,
    task: str,
    data: TaskData,
    batch_size: int = 64,
    passes: int = 1,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Recomputes ``task``'s running statistics from ``data``'s training images (no labels).

    Only ``task``'s statistics change; weights, routes, heads and every other
    task's statistics stay bit-identical.

    Args:
        model: The model; its mode and BatchNorm settings are restored afterwards.
        task: The task whose statistics are re-estimated.
        data: Images of the task's domain (its labels are not read).
        batch_size: Images per forward pass.
        passes: Passes over the training images (shuffled per pass).
        device: Where the forward passes run.
        seed: Seed of the shuffles.
        progress: Show a progress bar.

    Returns:
        Per batch, the gap between the batch's statistics and the statistics
        stored before it: the mean over all BatchNorm channels of
        ``(batch_mean - running_mean)**2 / running_var``. Large at first (the
        source's statistics against target images), then at the level of batch noise.
    """
    norms = batchnorm_modules(model)
    if not norms:
        raise AdaptationError(
            "this model has no BatchNorm statistics to re-estimate (e.g. a ViT with "
            "LayerNorm): use a gradient objective "
            f"({', '.join(objective_names(uses_gradients=True))}) instead"
        )
    pairs = _means_and_vars(model, task)
    counters = [
        value
        for key, value in model.norm_stats[task].state_dict(keep_vars=True).items()
        if key.endswith("num_batches_tracked")
    ]
    was_training, was_frozen = model.training, getattr(model, "norm_stats_frozen", False)
    was_chosen = getattr(model, "_norm_stats_tasks", None)  # set_trainable's tasks
    momenta = [m.momentum for m in norms]
    gaps: list[float] = []
    try:
        for module in norms:
            module.momentum = None  # cumulative average: batch n weighs 1/n
        for counter in counters:
            counter.zero_()
        model.freeze_norm_stats(False)
        model.train()
        batches = list(_batches(len(data.train_x), batch_size, passes, seed))
        for seen, index in enumerate(tqdm(batches, desc=f"norm {task}", disable=not progress)):
            before = [(mean.clone(), var.clone()) for mean, var in pairs]
            x = data.normalize(data.train_x[index]).to(device)
            model.forward_features(x, task=task)
            gaps.append(_gap(before, pairs, seen + 1))
    finally:
        for module, momentum in zip(norms, momenta, strict=True):
            module.momentum = momentum
        model.freeze_norm_stats(was_frozen)
        model._norm_stats_tasks = was_chosen
        model.train(was_training)
    return gaps


def _batches(count: int, batch_size: int, passes: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max(1, passes)):
        order = torch.randperm(count, generator=generator)
        yield from order.split(batch_size)


def _gap(before, after, step: int) -> float:
    # With a cumulative average, running_n = running_{n-1} + (batch - running_{n-1}) / n.
    total, channels = 0.0, 0
    for (old_mean, old_var), (new_mean, _) in zip(before, after, strict=True):
        batch_minus_old = (new_mean - old_mean) * step
        total += float((batch_minus_old.pow(2) / old_var.clamp_min(1e-5)).sum())
        channels += old_mean.numel()
    value = total / max(1, channels)
    return value if math.isfinite(value) else float("inf")
