"""Feature extraction: per-layer outputs of a task's route, timm's feature wrappers.

``forward_intermediates`` follows timm's method of the same name (used by
``timm.create_model(..., features_only=True)`` through ``FeatureGetterNet``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from timm.models._features import FeatureGetterNet, feature_take_indices
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

if TYPE_CHECKING:
    from .model import ModularNet

FORMATS = ("NCHW", "NLC")


def feature_info(model: ModularNet) -> list[dict[str, Any]]:
    """timm's ``feature_info``: one entry per layer position."""
    trunk = model.trunk
    return [
        dict(num_chs=trunk.num_features, reduction=trunk.reduction, module=f"layers.{layer}")
        for layer in range(model.depth)
    ]


def take_indices(
    depth: int, indices: Any, name: str = "indices", layers: str | None = None
) -> list[int]:
    """The layer positions that ``indices`` picks of ``depth`` (timm's ``feature_take_indices``).

    Args:
        depth: The number of layer positions.
        indices: ``None`` for all, an int ``n`` for the last ``n``, or a sequence of
            positions (negative from the end).
        name: The argument's name in the error message (``out_indices`` for
            ``features_only`` models).
        layers: What has the ``depth`` layers, for the message (default: a model of
            that depth; a task whose shorter hard route runs fewer).

    Raises:
        ConfigError: A count or a position out of range, or indices of another kind.
    """
    if indices is None:
        return list(range(depth))
    integer = isinstance(indices, numbers.Integral) and not isinstance(indices, bool)
    if integer:
        fits = 1 <= indices <= depth
    else:
        fits = (
            isinstance(indices, Sequence)
            and not isinstance(indices, str)
            and len(indices) > 0
            and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices)
            and all(-depth <= i < depth for i in indices)
        )
    if not fits:
        raise ConfigError(
            f"{name}={indices!r} does not fit {layers or f'a model of depth {depth}'}: give a "
            f"count of last layers in 1..{depth} or layer positions in {-depth}..{depth - 1}"
        )
    take, _ = feature_take_indices(depth, int(indices) if integer else [int(i) for i in indices])
    return take


def forward_intermediates(
    model: ModularNet,
    x: torch.Tensor,
    indices: int | Sequence[int] | None,
    norm: bool,
    output_fmt: str,
    intermediates_only: bool,
    task: Any,
    route: Any,
    return_prefix_tokens: bool = False,
) -> list[Any] | tuple[torch.Tensor, list[Any]]:
    """See ``ModularNet.forward_intermediates``."""
    if output_fmt not in FORMATS:
        raise ConfigError(f"output_fmt must be one of {FORMATS}, got {output_fmt!r}")
    model._check_input(x)
    if route is not None:
        name, plan = model._override(task, route)
    else:
        name = model._resolve_single(task)
        if name is None:
            raise ConfigError(
                "forward_intermediates runs one task: pass task=<name>, not one task per sample"
            )
        plan = model.routes[name].plan(model.hypernet)
    shorter = f"task {name!r}, whose route runs {plan.depth} of the model's {model.depth} layers"
    take = take_indices(plan.depth, indices, layers=shorter if plan.depth < model.depth else None)
    kept: list[torch.Tensor] = []
    final = model._features(x, name, plan, kept)
    stats = model.norm_stats[name]
    outputs = [kept[i] for i in take]
    if norm:
        outputs = [model._trunk_stage("norm", h, stats) for h in outputs]
    size = tuple(x.shape[-2:])
    prefix = model.trunk.num_prefix_tokens
    formatted = [model.trunk.format_intermediate(h, size, output_fmt) for h in outputs]
    if return_prefix_tokens and prefix:  # as timm's ViT: (spatial, prefix) pairs
        formatted = list(zip(formatted, [h[:, :prefix] for h in outputs], strict=True))
    return formatted if intermediates_only else (final, formatted)


def checkpointed(
    run: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    stats: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """``run(x, weights, stats)`` under activation checkpointing.

    The recomputation in the backward pass runs on copies of the running statistics,
    so BatchNorm updates them once, as without checkpointing.
    """
    calls = []

    def layer(x: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        current = stats if not calls else {k: v.clone() for k, v in stats.items()}
        calls.append(None)
        return run(x, weights, current)

    return checkpoint(layer, x, weights, use_reentrant=False)


class ModnetFeatures(FeatureGetterNet):
    """``features_only=True`` model: a list of per-layer feature maps for one task.

    timm's ``FeatureGetterNet`` with the task (and a route override) as forward
    arguments. ``feature_info`` lists the chosen layer positions.
    """

    def forward(self, x: torch.Tensor, task: str | int | None = None, route: Any = None):
        """Feature maps ``[B, C, H', W']`` (or ``[B, N, C]`` for ``output_fmt="NLC"``)."""
        return self.model.forward_intermediates(
            x,
            indices=self.out_indices,
            norm=self.norm,
            output_fmt=self.output_fmt.value if hasattr(self.output_fmt, "value") else "NCHW",
            intermediates_only=True,
            task=task,
            route=route,
        )
