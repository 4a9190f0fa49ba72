"""Unsupervised multi-source adaptation on digits by re-routing a trained pool.

Sources (labelled): MNIST and USPS, optionally corrupted MNIST variants
(``mnist-shot_noise``, ``mnist-shear``, ``mnist-scale``). Target (unlabelled):
MNIST-M. For every seed: one template pool is trained on the sources, then each
objective adapts a new target route from it (in a copy of the run, so every
objective starts from the same pool). The target's labelled test split is only
used to measure accuracy: source-only (each source's route, head and
statistics; and the sources' average, where adaptation starts) against adapted.

Writes ``results.json``, ``results.md`` (mean ± std over seeds) and
``routes.png`` (first seed: the sources' routes, their average and each
objective's target route) into ``--out``.

Usage::

    python experiments/digits_adaptation.py --data-root ../shared/data
    python experiments/digits_adaptation.py --quick --synthetic

``--synthetic`` runs the same flow on the built-in synthetic suite (no data
needed); ``--quick`` is a one-seed smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import cell, markdown_table, timed, write_results  # noqa: E402
from modnet import io  # noqa: E402
from modnet.adapt import OBJECTIVES, AdaptResult, adapt, summary_lines  # noqa: E402
from modnet.adapt.relation import AVERAGE_KEY, START_KEY  # noqa: E402
from modnet.plot import route_heatmap, route_matrix  # noqa: E402
from modnet.train import TrainConfig, load_data, train  # noqa: E402


@dataclass
class Setup:
    """One experiment: domains, model and budget."""

    sources: list[str]
    target: str
    model_kwargs: dict[str, Any]
    train_limit: int
    test_limit: int
    source_epochs: int
    adapt_epochs: int
    batch_size: int
    seeds: list[int]
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVES))
    lr: float = 3e-3
    route_lr: float = 3e-2
    init: str = "average"


DIGITS = Setup(
    sources=["mnist", "usps", "mnist-colorize"],
    target="mnist_m",
    model_kwargs=dict(depth=8, width=32, exp_ratio=4.0, img_size=16, num_templates=6),
    train_limit=4000,
    test_limit=2000,
    source_epochs=4,
    adapt_epochs=3,
    batch_size=64,
    seeds=[0, 1, 2],
    init="nearest",
)
SYNTHETIC = Setup(
    sources=["synth_size", "synth_size-bg"],
    target="synth_size-color",
    model_kwargs=dict(depth=6, width=16, exp_ratio=2.0, img_size=16, num_templates=4),
    train_limit=600,
    test_limit=300,
    source_epochs=5,
    adapt_epochs=6,
    batch_size=32,
    seeds=[0, 1, 2],
    lr=1e-2,
    route_lr=5e-2,
)


def quick(setup: Setup) -> Setup:
    """One seed, few images, few epochs: a smoke run of the whole flow."""
    return replace(
        setup,
        train_limit=min(setup.train_limit, 400),
        test_limit=min(setup.test_limit, 200),
        source_epochs=min(setup.source_epochs, 3),
        adapt_epochs=min(setup.adapt_epochs, 2),
        seeds=setup.seeds[:1],
    )


def run_seed(
    setup: Setup, seed: int, out: Path, data_root: str | None, parts: str, progress: bool
) -> dict[str, Any]:
    """Trains the sources once, then adapts the target with every objective."""
    base = TrainConfig(
        model="modnet_conv_tiny",
        model_kwargs=setup.model_kwargs,
        tasks=list(setup.sources),
        data_root=data_root,
        train_limit=setup.train_limit,
        test_limit=setup.test_limit,
        epochs=setup.source_epochs,
        batch_size=setup.batch_size,
        lr=setup.lr,
        route_lr=setup.route_lr,
        seed=seed,
        progress=progress,
    )
    sources_dir = out / f"seed{seed}" / "sources"
    trained = train(base, sources_dir, overwrite=True)
    specs = [*setup.sources, setup.target]
    preloaded = dict(zip(specs, load_data(specs, trained.model, base).values(), strict=True))
    config = replace(base, epochs=setup.adapt_epochs, tasks=[])
    record: dict[str, Any] = {"sources": trained.accuracy, "objectives": {}}
    for objective in setup.objectives:
        run_dir = out / f"seed{seed}" / objective
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(sources_dir, run_dir)
        result = adapt(
            run_dir,
            setup.target,
            sources=list(setup.sources),
            objective=objective,
            parts=parts,
            init=setup.init,
            config=config,
            preloaded=preloaded,
        )
        print("\n".join(summary_lines(result)), flush=True)
        record["objectives"][objective] = _summary(result)
        record["source_only"] = result.source_only
        record["start"] = result.start_accuracy
        record["init"] = result.init
        record["source_distances"] = result.extra.get("source_distances")
    return record


def _summary(result: AdaptResult) -> dict[str, Any]:
    trace = result.loss_trace
    return dict(
        accuracy=result.accuracy,
        source_accuracy=result.source_accuracy,
        trained_parameters=result.trained_parameters,
        auxiliary_parameters=result.auxiliary_parameters,
        adapted_statistics=result.adapted_statistics,
        first_loss=trace[0] if trace else None,
        last_loss=trace[-1] if trace else None,
        relation={k: {m: v[m] for m in ("cosine", "tv")} for k, v in result.relation["to"].items()},
        template_share_change=result.relation.get("template_share_change"),
        run_dir=str(result.run_dir),
    )


def _cell(records: list[dict[str, Any]], key: str, item: str) -> str:
    return cell([r[key][item] for r in records])


def tables(setup: Setup, records: list[dict[str, Any]], parts: str) -> list[str]:
    """Accuracy (%, mean ± std over seeds) and how the target routes relate to the sources'."""
    sources_line = ", ".join(
        f"{s} {cell([r['sources'][s] for r in records])}" for s in setup.sources
    )
    rows: list[list[Any]] = [
        [f"source-only: {s} (its route, head, statistics)", _cell(records, "source_only", s), 0]
        for s in setup.sources
    ]
    best = cell([max(r["source_only"].values()) for r in records])
    rows.append(["source-only: best single source (picked with target labels)", best, 0])
    start = cell([r["start"] for r in records])
    starts = {
        "average": "the sources' average",
        "nearest": "the nearest source, chosen without labels",
    }.get(setup.init, setup.init)
    rows.append([f"source-only: {starts} (where adaptation starts)", start, 0])
    for objective in setup.objectives:
        runs = [r["objectives"][objective] for r in records]
        first = runs[0]
        count = f"{first['trained_parameters']:,}"
        if first["auxiliary_parameters"]:
            count += f" (+{first['auxiliary_parameters']:,} discriminator, discarded)"
        if first["adapted_statistics"]:
            count += f" ({first['adapted_statistics']:,} statistics re-estimated)"
        rows.append([f"adapted: {objective}", cell([r["accuracy"] for r in runs]), count])
    accuracy = (
        f"Accuracy (%) on the {setup.target} test split (its labels are used only here), "
        f"mean ± std over {len(records)} seed(s); adaptation trains: {parts}. The sources "
        f"on their own test splits: {sources_line}.\n\n"
        + markdown_table(["method", "target accuracy", "trained parameters"], rows)
    )
    references = [*setup.sources, AVERAGE_KEY, START_KEY]
    relation_rows = []
    for objective in setup.objectives:
        runs = [r["objectives"][objective] for r in records]
        cells = [
            f"{statistics.fmean(r['relation'][ref]['cosine'] for r in runs):.3f} / "
            f"{statistics.fmean(r['relation'][ref]['tv'] for r in runs):.3f}"
            for ref in references
        ]
        relation_rows.append([objective, *cells])
    relation = (
        "The target's route against the sources', their average and its own start "
        "(cosine similarity / total-variation distance of per-layer template shares, mean "
        "over layers and seeds). Heatmap of the first seed: `routes.png`.\n\n"
        + markdown_table(["objective", *references], relation_rows)
    )
    return [accuracy, relation]


def save_heatmap(setup: Setup, out: Path, seed: int) -> Path:
    """Sources, their average and each objective's target route, side by side."""
    matrices: dict[str, torch.Tensor] = {}
    first = out / f"seed{seed}" / setup.objectives[0]
    model, _ = io.load_model(first)
    for source in setup.sources:
        matrices[source] = route_matrix(model, source)
    matrices[AVERAGE_KEY] = torch.stack(list(matrices.values())).mean(0)
    for objective in setup.objectives:
        model, _ = io.load_model(out / f"seed{seed}" / objective)
        target = next(t for t in model.task_names if t not in setup.sources)
        matrices[objective] = route_matrix(model, target)
    return route_heatmap(matrices, out / "routes.png")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/experiments/digits_adaptation")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("MODNET_DATA_ROOT"),
        help="folder with the digit datasets (default: $MODNET_DATA_ROOT)",
    )
    parser.add_argument("--synthetic", action="store_true", help="the synthetic suite instead")
    parser.add_argument("--quick", action="store_true", help="one seed, a tiny budget")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2")
    parser.add_argument("--objectives", help=f"comma-separated, of {', '.join(OBJECTIVES)}")
    parser.add_argument("--sources", help="comma-separated source dataset specs")
    parser.add_argument("--train", default="route", dest="parts", help="what adapts")
    parser.add_argument("--init", help="where the target starts: average, nearest or a source")
    parser.add_argument("--train-limit", type=int, help="training images per domain")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    setup = SYNTHETIC if args.synthetic else DIGITS
    if args.quick:
        setup = quick(setup)
    if args.seeds:
        setup = replace(setup, seeds=list(args.seeds))
    if args.objectives:
        setup = replace(setup, objectives=args.objectives.split(","))
    if args.sources:
        setup = replace(setup, sources=args.sources.split(","))
    if args.train_limit:
        setup = replace(setup, train_limit=args.train_limit)
    if args.init:
        setup = replace(setup, init=args.init)
    out = Path(args.out)
    records, wall = timed(
        lambda: [
            run_seed(setup, seed, out, args.data_root, args.parts, args.progress)
            for seed in setup.seeds
        ]
    )
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python experiments/digits_adaptation.py {argv_text}".strip()
    sections = tables(setup, records, args.parts)
    sections.append(f"Wall time: {wall / 60:.1f} min.")
    data = dict(setup=asdict(setup), parts=args.parts, wall_s=wall, seeds=records)
    title = f"Adapting to {setup.target} from {', '.join(setup.sources)} without target labels"
    write_results(out, title, sections, data, command)
    save_heatmap(setup, out, setup.seeds[0])
    print((out / "results.md").read_text())
    return data


if __name__ == "__main__":
    main()
