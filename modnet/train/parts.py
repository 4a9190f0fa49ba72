"""What may train: named parts of a ModularNet, and optimizer groups for them."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable

from torch import nn

from ..errors import ConfigError
from ..model import ModularNet

PARTS = ModularNet.TRAINABLE_PARTS
ALL_PARTS = ModularNet.ALL_PARTS
# What every task of a model shares: training it while adding a task (transfer, adapt)
# changes the outputs of the tasks already there.
SHARED_PARTS = frozenset({"templates", "trunk", "stem", "hypernet"})


# Parts as --train names them (singular); ``new_templates`` is not one: --grow adds it.
CLI_PARTS = ("route", "head", "norm", "templates", "trunk", "stem", "hypernet")
_ALIASES = {"route": "routes", "head": "heads", "template": "templates"}


def parse_parts(text: str | Iterable[str]) -> frozenset[str]:
    """``"route,head"`` -> ``{"routes", "heads"}``; singular and plural both accepted.

    Raises:
        ConfigError: An unknown part (the closest name is suggested), nothing named,
            or ``new_templates``, which only ``--grow`` adds.
    """
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    parts = set()
    for item in filter(None, items):
        item = _ALIASES.get(item.lower(), item.lower())
        if item == "all":
            parts |= ALL_PARTS
        elif item == "new_templates":
            raise ConfigError(
                "--train new_templates: the new templates train when --grow N (grow=N) adds "
                "them; pass --grow and leave new_templates out of --train"
            )
        elif item in PARTS:
            parts.add(item)
        else:
            close = difflib.get_close_matches(item, [*CLI_PARTS, "all"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown part {item!r} to train{hint}: choose from {', '.join(CLI_PARTS)}, all"
            )
    if not parts:
        raise ConfigError("nothing to train: name at least one part, e.g. route,head")
    return frozenset(parts)


def shown(parts: Iterable[str]) -> str:
    """Parts as ``--train`` takes them: ``{"routes", "heads"}`` -> ``"head,route"``
    (``new_templates``, which ``--grow`` adds, left out)."""
    names = {p.removesuffix("s") if p in ("routes", "heads") else p for p in parts}
    return ",".join(sorted(names - {"new_templates"}))


def check_shared(parts: frozenset[str], update_shared: bool) -> None:
    """Refuses shared parts in ``parts`` unless the caller accepts that the run's
    existing tasks change with them (a new task alone never changes them).

    Raises:
        ConfigError: ``parts`` holds one of ``SHARED_PARTS`` and not ``update_shared``.
    """
    shared = parts & SHARED_PARTS
    if shared and not update_shared:
        named = f"all ({shown(shared)})" if ALL_PARTS - {"hypernet"} <= parts else shown(shared)
        raise ConfigError(
            f"--train {named} trains what every task of the run shares, so the "
            "run's existing tasks would change too: pass --update-shared (update_shared=True) "
            "to accept that (in a copy of the run, to keep this one as it is), or leave it "
            "out of --train"
        )


def present_parts(parts: frozenset[str], model: ModularNet) -> frozenset[str]:
    """``parts`` without those the model does not have (``hypernet`` of a model whose
    routes no hypernetwork makes: ``all`` then means the rest).

    Raises:
        ConfigError: Nothing named is in the model, so nothing would train.
    """
    absent = {"hypernet"} if model.hypernet is None else set()
    kept = parts - absent
    if parts & absent and not kept - {"norm"}:
        raise ConfigError(
            f"--train {shown(parts)}: this run has no hypernetwork (its routes are "
            f"{model.route_kind}), so nothing would train: choose from "
            f"{', '.join(p for p in CLI_PARTS if p not in absent)}"
        )
    return frozenset(kept)


def changed_shared(run_dir, phase: str, parts: Iterable[str], others: list[str]) -> None:
    """After ``phase`` trained shared parts: marks the accuracies ``results.json`` holds
    for the run's other tasks as outdated (``io.mark_outdated``) and says so."""
    from .. import io

    shared = sorted(set(parts) & SHARED_PARTS)
    if shared and others:
        io.mark_outdated(run_dir, others, phase)
        io.run.note(
            f"{', '.join(shared)} trained, so {', '.join(others)} changed too; the accuracies "
            f"recorded for them are from before (results.json marks them outdated): "
            f"`modnet eval {run_dir}` scores them now"
        )


def configure_trainable(
    model: ModularNet,
    parts: frozenset[str],
    tasks: Iterable[str],
    first_new_chunk: int | None = None,
) -> None:
    """Deprecated: use ``model.set_trainable(tasks, parts, first_new_chunk)``."""
    warnings.warn(
        "configure_trainable(model, parts, tasks) is deprecated: use "
        "model.set_trainable(tasks, parts)",
        DeprecationWarning,
        stacklevel=2,
    )
    model.set_trainable(list(tasks), sorted(parts), first_new_chunk)


def optimizer_groups(
    model: ModularNet, lr: float, route_lr: float, head_lr: float, weight_decay: float
) -> list[dict]:
    """Trainable parameters in groups with their own learning rates and weight decay.

    Decay follows ``model.no_weight_decay()`` (norm parameters, biases, routes and
    hypernetwork are not decayed), so ``timm.optim.create_optimizer_v2`` makes the
    same split. Routes learn faster than templates (tens of numbers steering many
    weights); heads have their own learning rate.

    Returns:
        Groups ``decay``, ``no_decay``, ``routes``, ``heads`` and ``head_biases``
        (those with parameters), each with ``name``, ``lr`` and ``weight_decay``.
    """
    no_decay = model.no_weight_decay()
    route_params = {id(p) for p in model.parameter_groups()["routes"]}
    head_params = {id(p) for p in model.heads.parameters()}
    groups: dict[str, list[nn.Parameter]] = {
        k: [] for k in ("decay", "no_decay", "routes", "heads", "head_biases")
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in route_params:
            groups["routes"].append(param)
        elif id(param) in head_params:
            groups["head_biases" if name in no_decay else "heads"].append(param)
        else:
            groups["no_decay" if name in no_decay else "decay"].append(param)
    settings = {
        "decay": dict(lr=lr, weight_decay=weight_decay),
        "no_decay": dict(lr=lr, weight_decay=0.0),
        "routes": dict(lr=route_lr, weight_decay=0.0),
        "heads": dict(lr=head_lr, weight_decay=weight_decay),
        "head_biases": dict(lr=head_lr, weight_decay=0.0),
    }
    return [
        dict(params=params, name=name, **settings[name])
        for name, params in groups.items()
        if params
    ]
