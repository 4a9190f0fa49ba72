"""``modnet train``: train a template pool and one route per task."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ConfigError
from ._options import (
    TRAIN_FIELDS,
    accuracy_table,
    add_config_option,
    add_model_arg_option,
    add_training_options,
    parse_model_args,
    saving_options,
    training_options,
)

DEFAULT_MODEL = "modnet_conv_tiny"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a pool of modules on several tasks",
        description="Train a template pool with one route and head per task. With no "
        "arguments: modnet_conv_tiny on the built-in synthetic suite (no data needed).",
    )
    parser.add_argument("--tasks", help="comma-separated dataset specs (default: synthetic suite)")
    parser.add_argument("--model", help=f"a modnet_* model name (default: {DEFAULT_MODEL})")
    add_model_arg_option(parser)
    parser.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the modnet run in --out (only what modnet wrote there is removed)",
    )
    add_training_options(parser)
    add_config_option(parser, TRAIN_FIELDS)
    parser.set_defaults(func=run)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of the run, resolved: flags over ``--config`` over defaults."""
    from ..data import SYNTHETIC_DEFAULT_TASKS

    tasks = args.tasks
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",")]
    elif tasks is not None:  # a list from --config
        tasks = [str(t).strip() for t in tasks]
    if tasks is not None and not all(tasks):
        raise ConfigError(
            f"--tasks {args.tasks!r} has an empty entry: list dataset specs separated by commas "
            "(e.g. synth_color,synth_size), or leave --tasks out for the synthetic suite"
        )
    return dict(
        model=args.model or DEFAULT_MODEL,
        model_kwargs=parse_model_args(args.model_arg),
        tasks=list(tasks if tasks is not None else SYNTHETIC_DEFAULT_TASKS),
        **training_options(args),
    )


def run(args: argparse.Namespace) -> int:
    from ..io import check_run_target
    from ..train import TrainConfig, train
    from ._options import check_writable

    check_run_target(args.out)  # a file, or a folder modnet did not write
    check_writable(args.out)
    resolved = options(args)
    with saving_options("train", resolved):
        result = train(TrainConfig(**resolved), args.out, overwrite=args.overwrite)
    print_summary(result)
    return 0


def print_summary(result) -> None:
    """The accuracy table and where the run went (rank 0 only)."""
    if not result.is_main:
        return
    print(accuracy_table(result.accuracy, result.model.task_classes))
    print(f"trained parameters: {result.trained_parameters:,}")
    print(f"run directory: {result.run_dir}  (checkpoint {result.checkpoint.name})")
