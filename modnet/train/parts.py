"""What may train: named parts of a ModularNet, and optimizer groups for them."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import ConfigError
from ..model import ModularNet

PARTS = ("templates", "new_templates", "trunk", "routes", "hypernet", "heads", "norm", "stem")
ALL_PARTS = frozenset({"templates", "trunk", "routes", "hypernet", "heads", "norm"})


def parse_parts(text: str | Iterable[str]) -> frozenset[str]:
    """``"route,head"`` -> ``{"routes", "heads"}``; singular and plural both accepted."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    aliases = {"route": "routes", "head": "heads", "template": "templates", "all": "all"}
    parts = set()
    for item in filter(None, items):
        item = aliases.get(item, item)
        if item == "all":
            parts |= ALL_PARTS
        elif item in PARTS:
            parts.add(item)
        else:
            raise ConfigError(
                f"unknown part {item!r} to train: choose from {', '.join(PARTS)}, all"
            )
    if not parts:
        raise ConfigError("nothing to train: name at least one part, e.g. route,head")
    return frozenset(parts)


def configure_trainable(
    model: ModularNet,
    parts: frozenset[str],
    tasks: Iterable[str],
    first_new_chunk: int | None = None,
) -> None:
    """Sets ``requires_grad`` so that only ``parts`` of ``tasks`` train.

    Frozen tensors get no gradient at all, so data parallelism needs no
    unused-parameter detection and frozen values stay bit-identical.

    Args:
        parts: Names from ``PARTS``. ``norm`` lets BatchNorm statistics of the
            trained tasks update; without it they stay frozen. ``stem`` is the
            trunk's embedding only; ``new_templates`` the chunks from
            ``first_new_chunk`` on.
    """
    tasks = list(tasks)
    model.requires_grad_(False)
    if "templates" in parts:
        model.pool.requires_grad_(True)
    if "new_templates" in parts:
        if first_new_chunk is None:
            raise ConfigError("new_templates can train only after growing the pool (--grow N)")
        for chunk in list(model.pool.chunks)[first_new_chunk:]:
            chunk.requires_grad_(True)
    if "trunk" in parts:
        model.trunk.requires_grad_(True)
    if "stem" in parts:
        for param in model.trunk.stem_parameters():
            param.requires_grad_(True)
    for task in tasks:
        if "routes" in parts:
            model.routes[task].requires_grad_(True)
        if "heads" in parts:
            model.heads[task].requires_grad_(True)
    if "hypernet" in parts and model.hypernet is not None:
        model.hypernet.requires_grad_(True)
    model.freeze_norm_stats("norm" not in parts)


def optimizer_groups(
    model: ModularNet, lr: float, route_lr: float, head_lr: float, weight_decay: float
) -> list[dict]:
    """Trainable parameters in groups with their own learning rates.

    Routes learn faster than templates (tens of numbers steering many weights),
    and are never weight-decayed: decay would pull every route toward uniform.
    """
    groups: dict[str, list[nn.Parameter]] = {
        k: [] for k in ("decay", "no_decay", "routes", "heads")
    }
    route_params = {id(p) for p in model.parameter_groups()["routes"]}
    head_params = {id(p) for p in model.heads.parameters()}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in route_params:
            groups["routes"].append(param)
        elif id(param) in head_params:
            groups["heads"].append(param)
        elif param.ndim >= 2:
            groups["decay"].append(param)
        else:
            groups["no_decay"].append(param)
    settings = {
        "decay": dict(lr=lr, weight_decay=weight_decay),
        "no_decay": dict(lr=lr, weight_decay=0.0),
        "routes": dict(lr=route_lr, weight_decay=0.0),
        "heads": dict(lr=head_lr, weight_decay=weight_decay),
    }
    return [
        dict(params=params, name=name, base_lr=settings[name]["lr"], **settings[name])
        for name, params in groups.items()
        if params
    ]
