"""A small optimisation loop for composition: coefficients, heads, single modules.

Composition trains few parameters for few steps (aTLAS coefficients, a module
under a Fisher penalty), often full-batch, without run directories or
checkpoints. Each step is the training loop's own ``StepRunner`` (optimizer,
warm-up and cosine schedule, clipping); only the loss is composition's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..train.step import StepRunner


def fit(
    loss_fn: Callable[[int], torch.Tensor],
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    steps: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    grad_clip: float | None = 1.0,
) -> list[float]:
    """Minimises ``loss_fn(step)`` over ``params`` with AdamW and a cosine schedule.

    Args:
        loss_fn: The loss at a step (it draws its own batch).
        params: Parameters, or optimizer groups ``{"params": [...], "lr": ...}``.
        steps: Optimisation steps.
        lr: Peak learning rate (a group's own ``lr`` overrides it).
        weight_decay: AdamW's decoupled weight decay (a group's own overrides it).
        warmup: Fraction of the steps spent warming the learning rate up linearly.
        grad_clip: Clip the global gradient norm to this value (None: no clipping).

    Returns:
        The loss of every step.

    Raises:
        ValueError: ``steps < 1`` or no parameter requires a gradient.
        FloatingPointError: The loss became NaN or infinite.
    """
    if steps < 1:
        raise ValueError(f"fit needs steps >= 1, got {steps}")
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    defaults = dict(lr=lr, weight_decay=weight_decay)
    groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("nothing to fit: every parameter given has requires_grad=False")
    runner = StepRunner(
        [], lambda step, _: (loss_fn(step), 1), groups, steps, int(warmup * steps), "adamw",
        grad_clip=grad_clip,
    )  # fmt: skip
    losses = []
    for step in range(steps):
        value, _ = runner.run(step)
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss became {value} at step {step}: lower the lr")
        losses.append(value)
    return losses


def prediction_entropy(logits: torch.Tensor, balance: float = 0.0) -> torch.Tensor:
    """Mean entropy of the predicted class distributions: an unsupervised objective.

    Minimising it on unlabelled images makes the model confident on them (aTLAS
    learns coefficients this way without labels). Alone it is also minimised by
    predicting one class for every image; ``balance`` subtracts that many times the
    entropy of the batch's mean prediction, which rewards using every class
    (information maximisation).
    """
    logp = logits.float().log_softmax(-1)
    loss = -(logp.exp() * logp).sum(-1).mean()
    if balance:
        mean = logp.exp().mean(0)
        loss = loss + balance * (mean * mean.clamp_min(1e-12).log()).sum()
    return loss
