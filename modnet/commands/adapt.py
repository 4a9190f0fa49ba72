"""``modnet adapt``: a new, unlabelled domain as one more route over a trained pool."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from ..errors import ConfigError
from ._options import add_training_options, config_from_args

BUILT_IN_OBJECTIVES = "moments, entropy, adversarial, norm_stats"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapt",
        help="adapt a trained pool to an unlabelled domain",
        description="Unsupervised multi-source domain adaptation: the target domain gets its "
        "own route (started from a source's or from their average), trained without target "
        "labels; the pool and heads stay frozen unless --train says otherwise. Source-only "
        "and adapted accuracy on the target's test split (used only for evaluation) are "
        "printed and saved in RUN_DIR/results.json; the target is saved as a task of the run.",
    )
    parser.add_argument("run_dir", help="run directory from `modnet train` holding the sources")
    parser.add_argument(
        "--target", required=True, help="dataset spec of the target domain (e.g. mnist_m)"
    )
    parser.add_argument(
        "--sources",
        help="comma-separated source tasks of the run (default: every task with the "
        "target's number of classes)",
    )
    parser.add_argument(
        "--objective",
        default="moments",
        help=f"what adaptation minimises: {BUILT_IN_OBJECTIVES} (default: moments)",
    )
    parser.add_argument(
        "--objective-arg",
        action="append",
        metavar="KEY=VALUE",
        help="objective option, e.g. diversity=0.5 or hidden=32 (repeatable)",
    )
    parser.add_argument(
        "--train",
        default="route",
        dest="parts",
        help="what adapts: route (default; the paper's claim), route,norm (also the "
        "target's norm statistics, re-estimated first), route,stem (also the shared stem; "
        "the sources keep their supervised loss), or any of route, head, norm, stem, "
        "templates, trunk",
    )
    parser.add_argument(
        "--init",
        default="average",
        help="where the target's route and statistics start: average (of the sources), "
        "nearest (the source whose features the target's images match best, chosen "
        "without labels) or a source task",
    )
    parser.add_argument("--head-init", help="where the target's head starts (default: --init)")
    parser.add_argument(
        "--source-weight",
        type=float,
        default=1.0,
        help="weight of the sources' supervised loss when a shared part trains",
    )
    parser.add_argument("--overwrite", action="store_true", help="adapt again if the task exists")
    add_training_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..adapt import adapt, summary_lines

    result = adapt(
        args.run_dir,
        args.target,
        sources=args.sources,
        objective=args.objective,
        parts=args.parts,
        init=args.init,
        head_init=args.head_init,
        config=config_from_args(args),
        objective_options=parse_objective_args(args.objective_arg),
        source_weight=args.source_weight,
        overwrite=args.overwrite,
    )
    if result.is_main:
        print("\n".join(summary_lines(result)))
        print(f"run directory: {result.run_dir}  (checkpoint {result.checkpoint.name})")
    return 0


def parse_objective_args(items: list[str] | None) -> dict[str, Any]:
    """``["diversity=0.5"]`` -> ``{"diversity": 0.5}``."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--objective-arg expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed
