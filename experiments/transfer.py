"""Claim 2: transfer by adjusting the order of computation.

A pool trained on some tasks learns a held-out task with the pool frozen, by
training (a) the head only (linear probe), (b) the route only (head fixed at its
random initialisation), (c) route + head, (d) route + head + norm statistics,
(e) the same plus 2 new templates (``--grow 2``), and (f) full fine-tuning of the
pool for the new task. Every method starts from the same trained run (a copy),
with the route and statistics of the first source task.

    python experiments/transfer.py --data-root ../shared/data --out runs/experiments/transfer
    python experiments/transfer.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    QUICK_MODEL,
    base_config,
    cell,
    command_line,
    markdown_table,
    parser,
    seeds,
    write_results,
)
from modnet import io  # noqa: E402
from modnet.train import train, transfer  # noqa: E402

FULL_SOURCES = ["mnist", "usps", "mnist_m", "cifar10"]
FULL_TARGET = "fashion_mnist"
QUICK_SOURCES = ["synth_color", "synth_size"]
QUICK_TARGET = "synth_shape"
FULL = dict(model="modnet_conv_tiny", epochs=3, train_limit=3000, test_limit=1000, batch_size=64)
QUICK = dict(
    model="modnet_conv_tiny",
    epochs=2,
    train_limit=320,
    test_limit=96,
    batch_size=32,
    lr=1e-2,
    route_lr=5e-2,
)
METHODS = {
    "head only (linear probe)": dict(parts="head"),
    "route only": dict(parts="route"),
    "route + head": dict(parts="route,head"),
    "route + head + norm": dict(parts="route,head,norm"),
    "route + head + norm, grow 2": dict(parts="route,head,norm", grow=2),
    "full fine-tuning": dict(parts="all"),
}


def main(argv=None) -> dict:
    p = parser("Claim 2: transfer to a held-out task by routes", "runs/experiments/transfer")
    args = p.parse_args(argv)
    sources = QUICK_SOURCES if args.quick else FULL_SOURCES
    target = QUICK_TARGET if args.quick else FULL_TARGET
    out = Path(args.out)
    accuracy = {m: [] for m in METHODS}
    trained = {}
    source_accuracy = []
    for seed in seeds(args):
        config = base_config(args, FULL, QUICK)
        config.seed, config.tasks = seed, sources
        config.model_kwargs = dict(QUICK_MODEL) if args.quick else {}
        source_run = out / f"seed{seed}" / "sources"
        source_accuracy.append(train(config, source_run, overwrite=True).accuracy)
        pool_run, _ = io.load_model(source_run)
        for index, (method, options) in enumerate(METHODS.items()):
            run_dir = out / f"seed{seed}" / f"method{index}"
            io.save_checkpoint(run_dir, "sources", pool_run)
            result = transfer(run_dir, target, config=config, init_from=sources[0], **options)
            accuracy[method].append(result.accuracy[target])
            trained[method] = result.trained_parameters
    rows = [[m, cell(accuracy[m]), f"{trained[m]:,}"] for m in METHODS]
    table = markdown_table(["method", f"{target} accuracy (%)", "trained parameters"], rows)
    src = {t: cell([a[t] for a in source_accuracy]) for t in sources}
    sections = [
        f"## Transfer to held-out `{target}` from a pool trained on {', '.join(sources)}",
        f"Mean ± std over seeds {seeds(args)}. Source-task accuracy of the pool: "
        + ", ".join(f"{t} {v}" for t, v in src.items())
        + ".",
        table,
        "Every method starts from the first source task's route and statistics and a new "
        "head; 'route only' keeps that head at its random initialisation. Full fine-tuning "
        "also trains all templates and the trunk (it would change every other task).",
    ]
    command = command_line(__file__, argv)
    data = dict(
        accuracy=accuracy,
        trained_parameters=trained,
        sources=sources,
        target=target,
        source_accuracy=source_accuracy,
        seeds=seeds(args),
    )
    write_results(out, "Transfer by adjusting the order of computation", sections, data, command)
    print(table)
    return data


if __name__ == "__main__":
    main()
