"""Claim 1: multi-task learning with soft weight sharing; claim 4: self-organisation.

One pool of K=4 templates with a softmax route per task, trained on all tasks
together, against (a) one independent plain network per task of the same depth
and (b) one shared plain network with per-task heads. A plain network is a modnet
model with one template per layer and the identity hard route (K = L), so all three
run through the same trainer. Claim 4 reads the modular run's routes: heatmap,
entropy per layer, task-task similarity.

    python experiments/multitask.py --data-root ../shared/data --out runs/experiments/multitask
    python experiments/multitask.py --quick      # synthetic suite, tiny model
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
from experiments.route_analysis import analyse_routes, analysis_markdown  # noqa: E402
from modnet.plot import save_route_figures  # noqa: E402
from modnet.train import train  # noqa: E402

FULL_TASKS = ["mnist", "fashion_mnist", "usps", "mnist_m", "cifar10"]
QUICK_TASKS = ["synth_shape", "synth_color", "synth_size"]
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


def methods(args) -> dict[str, dict]:
    """Model options of each method; depth and width follow the paper's configuration."""
    base = dict(QUICK_MODEL) if args.quick else {}
    depth = base.get("depth", 16)
    modular_k = 2 if args.quick else 4
    return {
        "modular": dict(base, num_templates=modular_k, route="softmax"),
        "independent": dict(base, num_templates=depth, route="hard"),
        "shared": dict(base, num_templates=depth, route="hard"),
    }


def count(model, prefixes=None) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters() if prefixes is None or n.startswith(prefixes)
    )


def main(argv=None) -> dict:
    p = parser(
        "Claims 1 and 4: multi-task soft weight sharing and route self-organisation",
        "runs/experiments/multitask",
    )
    args = p.parse_args(argv)
    tasks = QUICK_TASKS if args.quick else FULL_TASKS
    out = Path(args.out)
    accuracy = {m: {t: [] for t in tasks} for m in methods(args)}
    params: dict[str, dict] = {}
    analyses = []
    for seed in seeds(args):
        for method, model_kwargs in methods(args).items():
            config = base_config(args, FULL, QUICK)
            config.model_kwargs, config.seed = model_kwargs, seed
            if method == "independent":
                total = 0
                for task in tasks:
                    config.tasks = [task]
                    result = train(config, out / f"seed{seed}" / f"{method}-{task}", overwrite=True)
                    accuracy[method][task].append(result.accuracy[task])
                    total += count(result.model)
                params[method] = dict(total=total, per_task=total // len(tasks))
                continue
            config.tasks = tasks
            result = train(config, out / f"seed{seed}" / method, overwrite=True)
            for task in tasks:
                accuracy[method][task].append(result.accuracy[task])
            per_task = count(result.model, ("routes.", "heads.")) // len(tasks)
            params[method] = dict(total=count(result.model), per_task=per_task)
            if method == "modular":
                analyses.append(analyse_routes(result.model))
                if seed == seeds(args)[0]:
                    save_route_figures(result.model, out)
    header = ["method", *tasks, "mean", "total params", "params added per task"]
    rows = []
    for method, per_task in accuracy.items():
        mean = [sum(v[i] for v in per_task.values()) / len(tasks) for i in range(len(seeds(args)))]
        rows.append(
            [
                method,
                *[cell(per_task[t]) for t in tasks],
                cell(mean),
                f"{params[method]['total']:,}",
                f"{params[method]['per_task']:,}",
            ]
        )
    table = markdown_table(header, rows)
    sections = [
        "## Claim 1: test accuracy (%) per task, mean ± std over seeds " + str(seeds(args)),
        table,
        "Parameters added per task: modular = route + head; independent = a whole network; "
        "shared = head (BatchNorm statistics are per task in all three and are not parameters).",
        "## Claim 4: route self-organisation (modular run, first seed)",
        "![routes](routes.png)",
        analysis_markdown(analyses[0]),
    ]
    command = command_line(__file__, argv)
    data = dict(accuracy=accuracy, params=params, routes=analyses, seeds=seeds(args), tasks=tasks)
    write_results(out, "Multi-task learning with a shared template pool", sections, data, command)
    print(table)
    return data


if __name__ == "__main__":
    main()
