"""``modnet discard``: drop a run's unfinished phase, keeping every finished task as it is."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "discard",
        help="discard a run's unfinished phase",
        description="Remove the checkpoints of the run's unfinished phase (train, transfer or "
        "adapt) and the TensorBoard event files of its discarded attempt, and point the run "
        "back at the last checkpoint of its finished phases, whose files are not touched: "
        "every finished task stays bit-identical.",
    )
    parser.add_argument("run_dir", help="run directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    from ..io import MANIFEST, discard_unfinished
    from ..train.tracking import MetricsLogger, discard_events
    from ._options import check_run_dir

    check_run_dir(args.run_dir)  # a file is named a file, as transfer and adapt name it
    phase, base = discard_unfinished(args.run_dir)
    MetricsLogger(args.run_dir, phase).discarded()  # the curves drop the discarded attempt
    # and TensorBoard its event files: those of attempts started after the run's base
    since = None if base is None else math.floor((base / MANIFEST).stat().st_mtime)
    discard_events(args.run_dir, phase, since)
    where = f"the run continues from {base.name}" if base else "the run holds no checkpoint now"
    print(f"discarded the unfinished phase {phase!r}: {where}")
    return 0
