"""Divergence: stop a run whose loss or weights left the finite, sane range.

A run has diverged when its loss is not finite, when its loss exceeds
``EXPLOSION`` times its starting value (floored at 1, so objectives that start
near 0 are judged on an absolute scale), or when a parameter or a running
statistic (BatchNorm mean and variance) is not finite. The error names the
step and suggests a fix the run does not already use; the checkpoint the run
would have written is not written, so ``LATEST`` keeps the last good one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DivergenceError
from .config import TrainConfig

EXPLOSION = 100.0


class DivergenceGuard:
    """Watches one phase's losses; ``check_loss`` each step, ``check_model`` before saving.

    Args:
        config: The run's options (what a suggested fix must not repeat).
        phase: The phase's name, for the message.
    """

    def __init__(self, config: TrainConfig, phase: str):
        self.config = config
        self.phase = phase
        self.start: float | None = None

    def check_loss(self, value: float, step: int) -> None:
        """Raises ``DivergenceError`` if the loss of 0-based ``step`` is non-finite or exploded."""
        if not math.isfinite(value):
            self._fail(step + 1, f"the loss became {value}")
        if self.start is None:
            self.start = value
            return
        limit = EXPLOSION * max(abs(self.start), 1.0)
        if value > limit:
            self._fail(
                step + 1,
                f"the loss exploded to {value:.3g}, over {EXPLOSION:g}x its start {self.start:.3g}",
            )

    def check_model(self, model: nn.Module, step: int) -> None:
        """Raises ``DivergenceError`` if a parameter or buffer is not finite after ``step``."""
        for kind, named in (
            ("parameter", model.named_parameters()),
            ("buffer", model.named_buffers()),
        ):
            for name, value in named:
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    self._fail(step, f"{kind} {name} is not finite")

    def _fail(self, step: int, what: str) -> None:
        raise DivergenceError(
            f"training diverged in phase {self.phase!r} at step {step}: {what}. Nothing "
            f"was saved from this step on (LATEST names the last good checkpoint). Try "
            f"{suggestion(self.config)}"
        )


def suggestion(config: TrainConfig) -> str:
    """Fixes the run does not use yet, most likely first."""
    fixes = [f"a lower learning rate (--lr {config.lr / 10:g}, now {config.lr:g})"]
    if config.route_lr > 0.1:
        fixes.append(f"--route-lr {config.route_lr / 10:g}")
    if not config.grad_clip:
        fixes.append("gradient clipping (--grad-clip 1)")
    if config.precision == "bf16":
        fixes.append("--precision fp32")
    return ", or ".join(fixes)
