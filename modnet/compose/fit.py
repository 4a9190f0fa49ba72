"""A small optimisation loop for composition: coefficients, heads, single modules.

Composition trains few parameters for few steps (aTLAS coefficients, a module
under a Fisher penalty), often full-batch, without run directories or
checkpoints. Each step is the training loop's own ``StepRunner`` (optimizer,
warm-up and cosine schedule, clipping); only the loss is composition's.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import DivergenceError
from ..train.step import StepRunner
from .task_vectors import scale_factor


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

    Every step's loss and gradients are checked before the optimizer steps: a step
    whose loss or gradient is NaN or infinite is not taken, so when ``fit`` raises,
    the parameters (and the optimizer) are as they were after the last good step.

    Args:
        loss_fn: The loss at a 0-based step, a one-element tensor (it draws its own batch).
        params: A list (or other iterable) of parameters, or optimizer groups
            ``{"params": [...], "lr": ...}``; as for torch's optimizers, not a lone tensor.
        steps: Optimisation steps, an integer >= 1.
        lr: Peak learning rate, >= 0 (a group's own ``lr`` overrides it).
        weight_decay: AdamW's decoupled weight decay, >= 0 (a group's own overrides it).
        warmup: Fraction of the steps, in [0, 1], spent warming the learning rate up linearly.
        grad_clip: Clip the global gradient norm to this value (None or 0: no clipping).

    Returns:
        The loss of every step.

    Raises:
        TypeError: ``params`` is a single tensor or module, or ``loss_fn`` returned
            something other than a one-element tensor.
        ValueError: A bad ``steps``, ``lr``, ``weight_decay``, ``warmup`` or
            ``grad_clip`` (before anything is trained), or no parameter requires a gradient.
        DivergenceError: A ``FloatingPointError``: the loss or a gradient became NaN or
            infinite; that step was not taken.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"fit needs steps to be an integer >= 1, got {steps!r}")
    _check_number("warmup", warmup, high=1.0)
    _check_number("grad_clip", 0.0 if grad_clip is None else grad_clip)
    if torch.is_tensor(params) or isinstance(params, torch.nn.Module):
        raise TypeError(
            f"fit takes a list of parameters, got a {type(params).__name__}: pass [p] or "
            "module.parameters()"
        )
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    defaults = dict(lr=lr, weight_decay=weight_decay)
    groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
    for group in groups:
        _check_number("lr", group["lr"])
        _check_number("weight_decay", group["weight_decay"])
    if not any(g["params"] for g in groups):
        raise ValueError("fit got no parameters to fit: pass a non-empty list")
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ValueError("nothing to fit: every parameter given has requires_grad=False")
    current = 0

    def share_loss(step: int, _share: int) -> tuple[torch.Tensor, int]:
        nonlocal current
        current, loss = step, loss_fn(step)
        if not torch.is_tensor(loss) or loss.numel() != 1:
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise TypeError(f"loss_fn must return a one-element tensor, got {shape}")
        value = float(loss.detach())
        if not math.isfinite(value):
            raise _diverged(f"the loss became {value}", step, lr)
        return loss, 1

    runner = StepRunner(
        [], share_loss, groups, steps, int(warmup * steps), "adamw", grad_clip=grad_clip
    )

    def check_gradients(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(p.grad.isfinite().all()):
                    raise _diverged("a gradient became NaN or infinite", current, lr)

    runner.optimizer.register_step_pre_hook(check_gradients)
    return [runner.run(step)[0] for step in range(steps)]


def _check_number(name: str, value: Any, high: float = math.inf) -> None:
    """Raises ValueError unless ``value`` is a finite real number (as ``scale_factor``
    reads it) in ``[0, high]``."""
    try:
        number = None if isinstance(value, bool) else scale_factor(value, name)
    except ValueError:  # NaN or infinite
        number = None
    if number is None or not 0 <= number <= high:
        bound = ">= 0" if high == math.inf else f"in [0, {high:g}]"
        raise ValueError(f"fit needs {name} to be a finite number {bound}, got {value!r}")


def _diverged(what: str, step: int, lr: float) -> DivergenceError:
    return DivergenceError(
        f"{what} at step {step}; that step was not taken, so the parameters are as after the "
        f"last good one: lower the lr (now {lr:g}) or check loss_fn"
    )


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
