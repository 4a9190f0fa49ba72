"""``modnet plot``: every figure of a run (route heatmaps and learning curves)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="route heatmaps and learning curves of a run (PNG)",
        description="Write routes.png (template share per layer for every task, with the "
        "route kind), routes.txt and curves.png (training loss, test accuracy per task and "
        "learning rate from metrics.jsonl) for a run directory.",
    )
    parser.add_argument("run_dir", help="run directory from `modnet train`")
    parser.add_argument("--task", action="append", help="task whose route to draw (repeatable)")
    parser.add_argument("--out", help="folder for the figures (default: run_dir)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace those figures if they exist (a run's own routes.png, routes.txt "
        "and curves.png are always redrawn)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Draws the figures; a run that has logged no step yet is refused before any is written.

    Raises:
        RunDirError: ``metrics.jsonl`` holds no record to draw curves from (the run
            was stopped before its first logged step).
    """
    from .. import io
    from ..errors import RunDirError
    from ..plot import METRICS_FILE, read_metrics, save_run_figures
    from ._options import figure_folder

    folder = figure_folder(args.run_dir, args.out, args.task, args.overwrite, curves=True)
    model, _ = io.load_model(args.run_dir, tasks=args.task)
    metrics = Path(args.run_dir) / METRICS_FILE
    if metrics.is_file() and not read_metrics(metrics):
        raise RunDirError(
            f"{args.run_dir} has logged no training step yet, so there are no curves to "
            f"draw: run its command again to resume it, or draw its routes alone with "
            f"`modnet routes {args.run_dir}`"
        )
    for path in save_run_figures(model, Path(args.run_dir), folder, args.task):
        print(path)
    return 0
