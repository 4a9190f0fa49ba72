"""Has a pool converged? Test accuracy per task over training, and a plateau test.

Reads the ``metrics.jsonl`` of one or more training runs (``modnet train``) and
reports, per task, the final test accuracy, the best one, and the gain over the
last fifth of training: the accuracy at the end minus the accuracy at the first
evaluation in the last fifth of the steps. A task has plateaued when that gain
is under ``--criterion`` points (default 0.5). Writes ``results.md``,
``results.json`` and ``curves.png`` (test accuracy against the epoch, one panel
per run) into ``--out``.

    python experiments/convergence.py runs/converge/pool-all runs/converge/loo-* \
        --out runs/experiments/convergence
    python experiments/convergence.py --quick
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    QUICK_MODEL,
    ExperimentParser,
    HelpFormatter,
    command_line,
    markdown_table,
    write_results,
)
from modnet.plot import _new_figure, _save, read_metrics  # noqa: E402
from modnet.train import TrainConfig, train  # noqa: E402


def accuracy_series(run_dir: Path) -> tuple[dict[str, list[tuple[float, float]]], float]:
    """Per task, ``(epoch, test accuracy)`` of every evaluation of the training phase;
    and the last epoch logged."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("phase") == "train"]
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        for task, value in (record.get("accuracy") or {}).items():
            series.setdefault(task, []).append((float(record["epoch"]), float(value)))
    last = max((float(r["epoch"]) for r in records), default=0.0)
    return series, last


def plateau(points: list[tuple[float, float]], last_epoch: float) -> dict[str, float]:
    """Final and best accuracy, and the gain over the last fifth of training (points):
    the final accuracy minus the last one measured before that fifth began."""
    start = 0.8 * last_epoch
    before = [p for p in points if p[0] <= start + 1e-9] or points[:1]
    return dict(
        final=points[-1][1],
        best=max(v for _, v in points),
        gain_last_fifth=100.0 * (points[-1][1] - before[-1][1]),
        evaluations=len(points),
    )


def curves(runs: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> Path:
    """Test accuracy per task against the epoch, one panel per run."""
    columns = min(3, len(runs))
    rows = -(-len(runs) // columns)
    figure = _new_figure(figsize=(3.6 * columns + 1.4, 3.0 * rows), dpi=110, layout="constrained")
    grid = figure.subplots(rows, columns, sharey=True, squeeze=False)
    axes = list(grid.flat)
    for spare in axes[len(runs) :]:
        spare.set_visible(False)
    axes = axes[: len(runs)]
    tasks = list(dict.fromkeys(task for series in runs.values() for task in series))
    colours = {task: f"C{index % 10}" for index, task in enumerate(tasks)}
    for ax, (name, series) in zip(axes, runs.items(), strict=True):
        for task, points in series.items():
            epochs, values = [e for e, _ in points], [v for _, v in points]
            ax.plot(epochs, values, marker="o", markersize=3, color=colours[task], label=task)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for ax in grid[:, 0]:
        ax.set_ylabel("test accuracy")
    axes[0].set_ylim(0.0, 1.0)
    handles = [figure.axes[0].plot([], [], color=colours[t], label=t)[0] for t in tasks]
    figure.legend(handles=handles, loc="outside right center", fontsize=8, title="task")
    figure.suptitle("Test accuracy during training", fontsize=10)
    return _save(figure, path)


def main(argv=None) -> dict[str, Any]:
    p = ExperimentParser(
        script=__file__,
        description="Convergence of training runs: curves and plateaus",
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", nargs="*", help="run directories of `modnet train`")
    p.add_argument("--out", default="runs/experiments/convergence", help="output folder")
    p.add_argument("--criterion", type=float, default=0.5, help="plateau: gain under this (points)")
    p.add_argument("--quick", action="store_true", help="train a tiny synthetic run and report it")
    args = p.parse_args(argv)
    out = Path(args.out)
    scratch = None
    runs = [Path(r) for r in args.runs]
    if args.quick:
        scratch = Path(tempfile.mkdtemp(prefix="convergence-"))
        config = TrainConfig(
            model_kwargs=dict(QUICK_MODEL), epochs=5, train_limit=192, test_limit=64, progress=False
        )
        train(config, scratch / "quick", overwrite=True)
        runs = [scratch / "quick"]
    if not runs:
        p.error("give at least one run directory (or --quick)")
    missing = [str(r) for r in runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        p.error(f"no metrics.jsonl in {', '.join(missing)}: give run directories of `modnet train`")
    series, table, rows = {}, {}, []
    for run in runs:
        points, last = accuracy_series(run)
        series[run.name] = points
        table[run.name] = {task: plateau(values, last) for task, values in points.items()}
        for task, stats in table[run.name].items():
            flat = stats["gain_last_fifth"] < args.criterion
            rows.append(
                [
                    run.name,
                    task,
                    f"{100 * stats['final']:.1f}",
                    f"{100 * stats['best']:.1f}",
                    f"{stats['gain_last_fifth']:+.1f}",
                    "yes" if flat else "no",
                ]
            )
    figure = curves(series, out / "curves.png")
    header = ["run", "task", "final (%)", "best (%)", "gain, last fifth (points)", "plateaued"]
    sections = [
        f"## Test accuracy at the end of training; plateau: gain under {args.criterion} points "
        "over the last fifth of the steps",
        markdown_table(header, rows),
        f"![test accuracy during training]({figure.name})",
    ]
    data = dict(
        plateau=table,
        criterion=args.criterion,
        runs=[r.name if args.quick else str(r) for r in runs],
    )
    write_results(out, "Convergence of the pools", sections, data, command_line(__file__, argv))
    print(markdown_table(header, rows))
    if scratch is not None:
        shutil.rmtree(scratch)
    return data


if __name__ == "__main__":
    main()
