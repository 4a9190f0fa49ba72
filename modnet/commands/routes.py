"""``modnet routes``: heatmap and table of every task's route."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "routes",
        help="route heatmap (PNG) and table per task",
        description="Write routes.png (layers x templates per task) and routes.txt, and "
        "print the table. Each cell is the template's share of the layer's weight: its "
        "coefficient for hard, softmax and sparsemax routes; for routes with signed or "
        "unnormalised coefficients (linear, most hypernetworks) its share of the layer's "
        "|coefficients|, which the table notes.",
    )
    parser.add_argument("run_dir", help="run or model directory")
    parser.add_argument("--task", action="append", help="task to show (repeatable; default all)")
    parser.add_argument(
        "--out",
        help="folder for routes.png / routes.txt, or routes-<task>.png / .txt with --task "
        "(default: run_dir)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace those files if they exist (a run's own routes.png / routes.txt are "
        "always redrawn)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..plot import save_route_figures
    from ._options import figure_folder

    folder = figure_folder(args.run_dir, args.out, args.task, args.overwrite)
    model, _ = io.load_model(args.run_dir, tasks=args.task)
    png, txt = save_route_figures(model, folder, args.task)
    print(txt.read_text())
    print(f"heatmap: {png}")
    return 0
