"""``modnet transfer``: learn a new task on a trained pool by its route (and head)."""

from __future__ import annotations

import argparse
from typing import Any

from ._options import (
    MODEL_FIELDS,
    TRAIN_FIELDS,
    add_config_option,
    add_training_options,
    check_run_dir,
    saving_options,
    training_options,
)
from .train import print_summary

DEFAULTS = dict(
    task=None,
    train="route,head",
    grow=0,
    init_from=None,
    route=None,
    route_init=None,
    update_shared=False,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transfer",
        help="learn a new task on a trained pool",
        description="Add a task to a trained run: the pool stays frozen and only what "
        "--train names learns (the new task's norm statistics start from --init-from's "
        "and learn only with --train ...,norm; without --init-from they always learn). "
        "Every existing task keeps bit-identical outputs, unless --update-shared lets "
        "--train change what all tasks share.",
    )
    parser.add_argument("run_dir", help="run directory from `modnet train`")
    parser.add_argument("--task", help="dataset spec of the new task (required)")
    parser.add_argument(
        "--train",
        help="what learns: route, head, norm, templates, trunk, stem, "
        "hypernet, all (default: route,head)",
    )
    parser.add_argument("--grow", type=int, help="add N templates that only the new task uses")
    parser.add_argument(
        "--init-from",
        "--init",  # adapt's spelling of the same choice
        dest="init_from",
        help="start route and norm statistics from this task, or from 'nearest': the task "
        "whose network the new task's images look most like (chosen without labels)",
    )
    parser.add_argument(
        "--route",
        choices=["anisotropic"],
        help="anisotropic: one coefficient per (layer, template, parameter tensor), "
        "starting from the --init-from route repeated",
    )
    parser.add_argument(
        "--anisotropic",  # adapt's spelling
        dest="route",
        action="store_const",
        const="anisotropic",
        help="the same as --route anisotropic",
    )
    parser.add_argument(
        "--route-init",
        choices=["uniform"],
        help="uniform: start the route at the uniform mixture (statistics still from --init-from)",
    )
    parser.add_argument(
        "--update-shared",
        action="store_true",
        default=None,
        help="let --train name what every task shares (templates, trunk, stem, hypernet): "
        "the run's existing tasks then change too",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="retrain the task if an earlier transfer added it "
        "(tasks the pool was trained with are never replaced)",
    )
    add_training_options(parser)
    keys = [*DEFAULTS, *(f for f in TRAIN_FIELDS if f not in MODEL_FIELDS)]
    add_config_option(parser, keys)
    parser.set_defaults(func=run)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the transfer, resolved: flags over ``--config`` over defaults."""
    from ..errors import ConfigError

    values = {k: v if (v := getattr(args, k)) is not None else d for k, d in DEFAULTS.items()}
    if not values["task"]:
        raise ConfigError("transfer needs the new task: pass --task SPEC (or task: in --config)")
    return {**values, **training_options(args)}


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, transfer

    check_run_dir(args.run_dir)
    resolved = options(args)
    own = {k: resolved.pop(k) for k in DEFAULTS}
    with saving_options("transfer", {**own, **resolved}):
        result = transfer(
            args.run_dir,
            own["task"],
            parts=own["train"],
            grow=own["grow"],
            config=TrainConfig(**resolved),
            init_from=own["init_from"],
            overwrite=args.overwrite,
            route=own["route"],
            route_init=own["route_init"],
            update_shared=own["update_shared"],
        )
    if result.is_main:
        name = next(iter(result.accuracy))
        _print_nearest(result.run_dir, f"transfer-{name}")
    print_summary(result)
    return 0


def _print_nearest(run_dir, phase: str) -> None:
    from .. import io

    recorded = io.read_results(run_dir).get(phase, {})
    distances = recorded.get("source_distances")
    if recorded.get("nearest") and distances:
        listed = ", ".join(f"{n} {d:.3g}" for n, d in sorted(distances.items(), key=lambda i: i[1]))
        print(f"init nearest: {recorded['nearest']} (feature distance: {listed})")
