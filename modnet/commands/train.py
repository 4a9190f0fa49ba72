"""``modnet train``: train a template pool and one route per task."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ._options import accuracy_table, add_training_options, config_from_args, parse_model_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a pool of modules on several tasks",
        description="Train a template pool with one route and head per task. With no "
        "arguments: modnet_conv_tiny on the built-in synthetic suite (no data needed).",
    )
    parser.add_argument("--tasks", help="comma-separated dataset specs (default: synthetic suite)")
    parser.add_argument("--model", default="modnet_conv_tiny", help="a modnet_* model name")
    parser.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="model option, e.g. num_templates=8 or route=hyper (repeatable)",
    )
    parser.add_argument("--out", default="runs/train", help="run directory (default: runs/train)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the modnet run in --out (only what modnet wrote there is removed)",
    )
    add_training_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import train

    tasks = [] if args.tasks is None else [t.strip() for t in args.tasks.split(",")]
    if args.tasks is not None and not all(tasks):
        raise ConfigError(
            f"--tasks {args.tasks!r} has an empty entry: list dataset specs separated by commas "
            "(e.g. synth_color,synth_size), or leave --tasks out for the synthetic suite"
        )
    config = config_from_args(
        args, model=args.model, model_kwargs=parse_model_args(args.model_arg), tasks=tasks
    )
    result = train(config, args.out, overwrite=args.overwrite)
    print_summary(result)
    return 0


def print_summary(result) -> None:
    """The accuracy table and where the run went (rank 0 only)."""
    if not result.is_main:
        return
    print(accuracy_table(result.accuracy, result.model.task_classes))
    print(f"trained parameters: {result.trained_parameters:,}")
    print(f"run directory: {result.run_dir}  (checkpoint {result.checkpoint.name})")
