"""Stochastic depth per layer position (Huang et al. 2016, "Deep Networks with Stochastic Depth").

A pool runs every layer through one skeleton block, so a block's own ``DropPath``
rate cannot differ between depths. The skeleton gets ``DropPath`` modules in the
places where timm blocks keep them (``drop_path``, ``drop_path1``, ``drop_path2``)
and the model sets their rate before each layer position runs. ``DropPath`` draws
no random numbers at rate 0, as timm's ``nn.Identity`` placeholder does not, so
a layer computes, and consumes the random stream, exactly as timm's block does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from .errors import ConfigError

SLOT_NAMES = ("drop_path", "drop_path1", "drop_path2")


def _slots(block: nn.Module) -> list[tuple[nn.Module, str]]:
    slots = []
    for module in block.modules():
        for name, child in module.named_children():
            if isinstance(child, DropPath) or (
                name in SLOT_NAMES and isinstance(child, nn.Identity)
            ):
                slots.append((module, name))
    return slots


def block_rate(block: nn.Module) -> float:
    """The drop-path rate of a block (0 when it has none).

    Raises:
        ConfigError: The block's drop-path modules have different rates.
    """
    rates = {
        float(getattr(owner, name).drop_prob) if isinstance(getattr(owner, name), DropPath) else 0.0
        for owner, name in _slots(block)
    }
    if len(rates) > 1:
        raise ConfigError(
            f"a {type(block).__name__} block has drop-path modules with different rates "
            f"{sorted(rates)}: modnet gives all of a layer's drop-path modules one rate"
        )
    return rates.pop() if rates else 0.0


def layer_rates(rate: float | Sequence[float], depth: int) -> tuple[float, ...]:
    """Per-position rates: timm's linear rule ``linspace(0, rate, depth)`` or explicit ones.

    Raises:
        ConfigError: A sequence of the wrong length, or a rate outside ``[0, 1)``.
    """
    if isinstance(rate, int | float):
        rates = tuple(float(r) for r in torch.linspace(0, float(rate), depth).tolist())
    else:
        rates = tuple(float(r) for r in rate)
        if len(rates) != depth:
            raise ConfigError(
                f"drop_path_rate has {len(rates)} rates for {depth} layer positions: give "
                "one per position, or one float for timm's linear rule"
            )
    if any(not 0.0 <= r < 1.0 for r in rates):
        raise ConfigError(f"drop-path rates must lie in [0, 1), got {list(rates)}")
    return rates


def install(skeleton: nn.Module, rates: Sequence[float]) -> list[DropPath]:
    """Puts ``DropPath`` modules into the skeleton's drop-path slots when a rate is non-zero.

    Returns the modules whose rate the model sets per layer (empty when all rates
    are 0, so a model without stochastic depth runs exactly as before).

    Raises:
        ConfigError: Non-zero rates and a block without drop-path slots.
    """
    if not any(rates):
        return []
    slots = _slots(skeleton)
    if not slots:
        raise ConfigError(
            f"drop_path_rate is set but a {type(skeleton).__name__} block has no drop-path "
            "module (drop_path, drop_path1, drop_path2): this block family has no "
            "stochastic depth; use drop_path_rate=0"
        )
    modules = []
    for owner, name in slots:
        module = DropPath(0.0)
        setattr(owner, name, module)
        modules.append(module)
    return modules


def at_rate(
    run: Callable[..., Any], modules: Sequence[DropPath], rate: float
) -> Callable[..., Any]:
    """``run`` with the skeleton's drop-path modules at ``rate`` while it runs.

    Set on every call, so a checkpointed layer recomputed in the backward pass
    drops paths at its own rate again.
    """

    def run_at_rate(*args: Any) -> Any:
        for module in modules:
            module.drop_prob = rate
        return run(*args)

    return run_at_rate
