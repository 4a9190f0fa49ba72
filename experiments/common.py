"""Shared plumbing of the experiment scripts: options, seeds, tables.

Every experiment is a short script over modnet's public API (``modnet.train``,
``modnet.io``, ``modnet.plot``): the same code paths a user runs. Each has a
``--quick`` mode (the synthetic suite, a tiny model, a minute or two) that the
test suite runs to keep it from rotting, and a full mode on real data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modnet.io import atomic_write_text, write_json
from modnet.train import TrainConfig

# A tiny conv model for quick modes: trains on the synthetic suite in seconds.
QUICK_MODEL = dict(depth=4, width=12, exp_ratio=2.0, img_size=16, num_templates=3)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its help already names it or
    the option has none (``None``, an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if "default" in (action.help or "") or default is None or default is False:
            return action.help
        if isinstance(default, (list, tuple)):  # as it is typed: 0 1 2
            return f"{action.help} (default: {' '.join(map(str, default))})"
        return super()._get_help_string(action)


class ExperimentParser(argparse.ArgumentParser):
    """Parses an experiment's options and refuses, before any work, an ``--out``
    whose ``results.md`` this experiment did not write (it would be replaced at the end).

    Args:
        script: The experiment's file (``__file__``).
    """

    def __init__(self, *args: Any, script: str, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # as `modnet`: no option taken by a prefix
        super().__init__(*args, **kwargs)
        self.script = Path(script).name

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        out = Path(parsed.out)
        if (out / "results.md").exists() and not written_by(out, self.script):
            self.error(
                f"--out {out} holds a results.md that {self.script} did not write: choose "
                "another --out"
            )
        return parsed


def written_by(out: Path, script: str) -> bool:
    """Whether ``out``'s results come from ``write_results`` of ``script`` (its
    ``results.json`` records the experiment's command)."""
    try:
        recorded = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    command = recorded.get("command") if isinstance(recorded, dict) else None
    return isinstance(command, str) and command.split(" ")[:2] == [
        "python",
        f"experiments/{script}",
    ]


def parser(
    description: str,
    default_out: str,
    defaults: dict[str, str] | None = None,
    training: bool = True,
) -> argparse.ArgumentParser:
    """The options every experiment shares; ``defaults`` words the defaults of
    ``epochs`` and ``train_limit`` where the experiment resolves them itself.
    ``training=False``: no data root and no training budget (the experiment makes
    its own data and has its own steps). The experiment is the caller's file."""
    defaults = defaults or {}
    script = sys._getframe(1).f_code.co_filename  # the experiment calling this
    p = ExperimentParser(description=description, formatter_class=HelpFormatter, script=script)
    p.add_argument("--out", default=default_out, help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument(
        "--quick",
        action="store_true",
        help="synthetic data, a tiny model, one seed: a smoke run of a minute or two",
    )
    if not training:
        return p
    p.add_argument(
        "--data-root",
        default=os.environ.get("MODNET_DATA_ROOT"),
        help="folder with the real datasets (default: $MODNET_DATA_ROOT)",
    )
    own = "the experiment's own"
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"training epochs (default: {defaults.get('epochs', own)})",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help=f"training images per task (default: {defaults.get('train_limit', own)})",
    )
    return p


def base_config(
    args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any]
) -> TrainConfig:
    """Training options of this experiment: ``quick`` or ``full`` values, then CLI overrides."""
    values = dict(quick if args.quick else full)
    values.setdefault("progress", False)
    values["data_root"] = args.data_root
    if args.epochs is not None:
        values["epochs"] = args.epochs
    if args.train_limit is not None:
        values["train_limit"] = args.train_limit
    return TrainConfig(**values)


def seeds(args: argparse.Namespace) -> list[int]:
    return args.seeds[:1] if args.quick else list(args.seeds)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"93.1 ± 0.4"``: mean and sample standard deviation (just the mean for one value)."""
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, as recorded in its results."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return " ".join([f"python experiments/{Path(script).name}", *args])


def write_results(
    out: Path, title: str, sections: Sequence[str], data: dict[str, Any], command: str
) -> None:
    """Writes ``results.md`` (tables, the command, the hardware) and ``results.json``."""
    out.mkdir(parents=True, exist_ok=True)
    hardware = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, fp32"
    text = [f"# {title}", "", f"Command: `{command}`", "", f"Hardware: {hardware}", ""]
    text += [s.rstrip() + "\n" for s in sections]
    atomic_write_text(out / "results.md", "\n".join(text))
    results = dict(data, command=command, hardware=hardware)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")


# How many differing options a refusal names (the rest are counted): one readable line.
NAMED_DIFFERENCES = 3


def refuse_other_options(
    cache: Path, recorded: Mapping[str, Any], wanted: Mapping[str, Any]
) -> None:
    """Refuses, in one line, results cached at ``cache`` that were measured with
    options other than ``wanted`` (those its ``recorded`` options differ in). An
    option ``recorded`` lacks (recorded before that option was) is not compared.

    Raises:
        SystemExit: Naming the first ``NAMED_DIFFERENCES`` differing options, as
            recorded and as wanted, and counting the rest.
    """
    wanted = json.loads(json.dumps(wanted))  # as a record reads back: tuples are lists
    differs = [k for k in wanted if k in recorded and recorded[k] != wanted[k]]
    if differs:
        named, rest = differs[:NAMED_DIFFERENCES], len(differs) - NAMED_DIFFERENCES
        was = ", ".join(f"{k}={recorded[k]}" for k in named)
        now = ", ".join(f"{k}={wanted[k]}" for k in named)
        more = f" ({rest} more option{'s differ' if rest > 1 else ' differs'})" if rest > 0 else ""
        raise SystemExit(
            f"error: {cache} was measured with {was}, not {now}{more}: pass another --out, "
            "or the same options to continue"
        )


def check_options(
    record: Path, options: Mapping[str, Any], cache: Path | None = None, cached: bool = False
) -> None:
    """The options of the results cached at ``cache`` (default: ``record``'s folder),
    before any work: recorded in the JSON file ``record`` the first time, refused
    (``refuse_other_options``) when they differ later. ``cached``: the cache already
    holds results, so a missing record (results made before options were recorded)
    is refused too rather than trusted.

    Raises:
        SystemExit: Other options than recorded, or results without a record.
    """
    cache = record.parent if cache is None else cache
    if record.is_file():
        refuse_other_options(cache, json.loads(record.read_text()), options)
        return
    if cached:
        raise SystemExit(
            f"error: {cache} holds results that do not record the options they were "
            "measured with: pass another --out"
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, dict(options))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start
