"""Why an adapted route stays where it starts: each objective's pull at the start route.

For a target task as adaptation initialises it (``add_target_task``), and for
each objective, on one fixed batch of target images (and of each source):

* the objective's gradient on the target's route logits, against the logits'
  own size: ``grad_norm`` and ``logit_norm``;
* the step it makes: plain gradient descent moves the logits by
  ``route_lr * grad_norm``; Adam(W), modnet's optimizer, moves each logit by at
  most about ``route_lr`` per step whatever the gradient's size, so
  ``adam_steps_to_move`` is how many steps a full-speed Adam needs to move the
  logits by their own norm;
* ``saturation``: the mean largest template share per layer (1: one-hot, where a
  softmax route's gradient vanishes);
* whether the objective already prefers the start: its value when the target
  starts at each source (route, head and statistics of that source) and at the
  sources' average, and ``prefers_start`` when no other start scores lower.

The adversarial objective's discriminator is untrained here, so its values say
nothing about the start; its gradient is taken at full reversal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data import TaskData
from ..model import ModularNet
from ..plot import route_matrix
from .objectives import make_objective, objective_class
from .target import AVERAGE, add_target_task


def _batch(data: TaskData, count: int, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train_x), generator=generator)[:count]
    return data.normalize(data.train_x[index]).to(device)


def _pooled(model: ModularNet, x: torch.Tensor, task: str) -> torch.Tensor:
    return model.forward_head(model.forward_features(x, task), task, pre_logits=True).float()


def diagnose_objectives(
    model: ModularNet,
    target: str,
    sources: Mapping[str, TaskData],
    target_data: TaskData,
    objectives: Sequence[str],
    route_lr: float,
    sample: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    objective_options: Mapping[str, Mapping[str, Any]] | None = None,
    start: str | None = None,
) -> dict[str, Any]:
    """Measures each objective's gradient at the target's start route and its preferred start.

    Args:
        model: A model holding the sources and the target task as initialised
            (its route is a ``SoftRoute``); nothing in it changes.
        target: The target task's name.
        sources: Source task name to its data (images only are read).
        target_data: The target's data (images only are read).
        objectives: Registered objective names; those that take no gradient
            steps (``norm_stats``) are skipped.
        route_lr: The route learning rate adaptation would use.
        sample: Images per domain in the fixed batch.
        seed: Seed of the batch and of the objectives' own randomness.
        device: Where the forward passes run.
        objective_options: Per objective, its keyword options.
        start: Which of the sources (or ``"average"``) the target started at;
            it is left out of the comparison, where it would tie with the start.

    Returns:
        ``{"route": {...}, "objectives": {name: {...}}}`` with the quantities of
        the module docstring; values are floats, ``values`` maps each start
        (``"start"``, each source, ``"average"``) to the objective's value.
    """
    options = dict(objective_options or {})
    was_training = model.training
    model.eval()
    route = model.routes[target]
    logits = route.logits
    shares = route_matrix(model, target)
    x_target = _batch(target_data, sample, seed, device)
    with torch.no_grad():
        source_features = {
            name: _pooled(model, _batch(data, sample, seed + 1 + i, device), name)
            for i, (name, data) in enumerate(sources.items())
        }
        starts = _other_starts(model, target, list(sources), target_data.num_classes, x_target)
    report: dict[str, Any] = {
        "route": {
            "logit_norm": float(logits.detach().norm()),
            "logit_count": logits.numel(),
            "saturation": float(shares.max(1).values.mean()),
            "route_lr": route_lr,
        },
        "objectives": {},
    }
    requires = logits.requires_grad
    logits.requires_grad_(True)
    try:
        for name in objectives:
            if not objective_class(name).uses_gradients:
                continue
            torch.manual_seed(seed)
            objective = make_objective(
                name, model.num_features, len(sources), **options.get(name, {})
            ).to(device)
            objective.progress = 1.0
            torch.manual_seed(seed)
            features = _pooled(model, x_target, target)
            loss = objective.loss(source_features, features, model.heads[target](features))
            (grad,) = torch.autograd.grad(loss, logits, allow_unused=True)
            grad_norm = 0.0 if grad is None else float(grad.norm())
            values = {"start": float(loss.detach())}
            with torch.no_grad():
                for candidate, (f, out) in starts.items():
                    torch.manual_seed(seed)
                    values[candidate] = float(objective.loss(source_features, f, out))
            others = {k: v for k, v in values.items() if k not in ("start", start)}
            ranked = {**others, (start or "start"): values["start"]}
            logit_norm = report["route"]["logit_norm"]
            report["objectives"][name] = {
                "loss": values["start"],
                "grad_norm": grad_norm,
                "grad_to_logits": grad_norm / max(logit_norm, 1e-12),
                "sgd_step": route_lr * grad_norm,
                "adam_steps_to_move": logit_norm / (route_lr * math.sqrt(logits.numel())),
                "values": values,
                "prefers_start": all(values["start"] <= v + 1e-9 for v in others.values()),
                "best_start": min(ranked, key=ranked.__getitem__),
            }
    finally:
        logits.requires_grad_(requires)
        model.train(was_training)
    return report


@torch.no_grad()
def _other_starts(
    model: ModularNet, target: str, sources: list[str], classes: int, x: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Target features and logits if the target had started at each source or the average."""
    starts = {}
    for start in [*sources, AVERAGE]:
        probe = f"{target}__probe"
        add_target_task(model, probe, classes, sources, init=start)
        try:
            features = _pooled(model, x, probe)
            starts[start] = (features, model.heads[probe](features))
        finally:
            model.delete_task(probe)
    return starts
