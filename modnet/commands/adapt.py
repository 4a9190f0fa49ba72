"""``modnet adapt``: a new, unlabelled domain as one more route over a trained pool."""

from __future__ import annotations

import argparse
from typing import Any

from ..adapt.objectives import objective_summary
from ._options import (
    MODEL_FIELDS,
    TRAIN_FIELDS,
    add_config_option,
    add_training_options,
    check_run_dir,
    parse_key_values,
    saving_options,
    training_options,
)

DEFAULTS = dict(
    target=None,
    sources=None,
    objective="moments",
    objective_options={},
    train="route",
    init="average",
    head_init=None,
    source_weight=1.0,
    anisotropic=False,
    update_shared=False,
)


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
        "--target", help="dataset spec of the target domain, e.g. mnist_m (required)"
    )
    parser.add_argument(
        "--sources",
        help="comma-separated source tasks of the run (default: every task with the "
        "target's number of classes)",
    )
    parser.add_argument(
        "--objective",
        help=f"what adaptation minimises: {objective_summary()} (default: moments)",
    )
    parser.add_argument(
        "--objective-arg",
        action="append",
        dest="objective_options",
        metavar="KEY=VALUE",
        help="objective option, e.g. diversity=0.5 or hidden=32 (repeatable)",
    )
    parser.add_argument(
        "--train",
        help="what adapts: route (default; the paper's claim), route,norm (also the "
        "target's norm statistics, re-estimated first), route,stem (also the shared stem; "
        "the sources keep their supervised loss; needs --update-shared), or any of route, "
        "head, norm, stem, templates, trunk, hypernet, all",
    )
    parser.add_argument(
        "--init",
        "--init-from",  # transfer's spelling of the same choice
        dest="init",
        help="where the target's route and statistics start: average (of the sources), "
        "nearest (the source whose features the target's images match best, chosen "
        "without labels) or a source task",
    )
    parser.add_argument("--head-init", help="where the target's head starts (default: --init)")
    parser.add_argument(
        "--source-weight",
        type=float,
        help="weight of the sources' supervised loss when a shared part trains (default: 1.0)",
    )
    parser.add_argument(
        "--anisotropic",
        action="store_true",
        default=None,
        help="the target's route gets one coefficient per block parameter tensor, each "
        "starting at its template's share",
    )
    parser.add_argument(
        "--route",
        choices=["anisotropic"],
        dest="anisotropic",
        action=_Anisotropic,
        help="--route anisotropic: transfer's spelling of --anisotropic",
    )
    parser.add_argument(
        "--update-shared",
        action="store_true",
        default=None,
        help="let --train name what every task shares (stem, templates, trunk): the sources "
        "and the run's other tasks then change too",
    )
    parser.add_argument("--overwrite", action="store_true", help="adapt again if the task exists")
    add_training_options(parser)
    keys = [*DEFAULTS, *(f for f in TRAIN_FIELDS if f not in MODEL_FIELDS)]
    add_config_option(parser, keys)
    parser.set_defaults(func=run)


class _Anisotropic(argparse.Action):
    """``--route anisotropic`` sets ``--anisotropic``, as ``transfer --route`` reads."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the adaptation, resolved: flags over ``--config`` over defaults."""
    from ..errors import ConfigError

    values = {k: v if (v := getattr(args, k)) is not None else d for k, d in DEFAULTS.items()}
    if not values["target"]:
        raise ConfigError(
            "adapt needs the target domain: pass --target SPEC (or target: in --config)"
        )
    values["objective_options"] = parse_key_values(args.objective_options, "--objective-arg")
    return {**values, **training_options(args)}


def run(args: argparse.Namespace) -> int:
    from ..adapt import adapt, summary_lines
    from ..train import TrainConfig

    check_run_dir(args.run_dir)
    resolved = options(args)
    own = {k: resolved.pop(k) for k in DEFAULTS}
    with saving_options("adapt", {**own, **resolved}, used_sources=True):
        result = adapt(
            args.run_dir,
            own["target"],
            sources=own["sources"],
            objective=own["objective"],
            parts=own["train"],
            init=own["init"],
            head_init=own["head_init"],
            config=TrainConfig(**resolved),
            objective_options=own["objective_options"],
            source_weight=own["source_weight"],
            overwrite=args.overwrite,
            anisotropic=own["anisotropic"],
            update_shared=own["update_shared"],
        )
    if result.is_main:
        print("\n".join(summary_lines(result)))
        print(f"run directory: {result.run_dir}  (checkpoint {result.checkpoint.name})")
    return 0
