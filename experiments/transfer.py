"""Claim 2, leave one out: learning a held-out task by adjusting the order of computation.

For each held-out task, a pool trained on the other datasets (``--datasets``;
a held-out spec that is not one of them, such as ``mnist-colorize``,
``npz:PATH`` or ``folder:PATH``, gets a pool trained on all of them) learns the
held-out task by each method of ``METHODS``, every one in its own copy of the
pool's run (the pool run itself is only read):

- head only (a linear probe), route only from the nearest task's route or from
  the uniform route, route + head, route + head + norm statistics, an
  anisotropic route + head, route + head + norm with 1 or 2 new templates, full
  fine-tuning, and the same network trained from scratch on the held-out task
  alone (same budget: ``--epochs``, ``--train-limit``).

Every transfer starts from the route, norm statistics (and, for a frozen head
with as many classes, the head) of the nearest source task, chosen without
labels from the held-out task's training images
(``modnet transfer --init-from nearest``). Pools live in ``--pools`` as
``loo-<held-out>`` or ``pool-all``: a finished one is reused, otherwise it is
trained there (an interrupted one resumes). Each (held-out, method, seed) result
is cached as a small JSON file under ``--out``/cells, so a killed run continues
where it stopped and several processes (say, with different ``--held-out``)
can share one ``--out``; the tables are rebuilt from every cached result.
``--out/options.json`` records what the cells depend on besides their seed (the
complete transfer options, ``--pools`` and the pool options): other options into
the same ``--out`` (another ``--pool-config``, ``--transfer-config``, ``--pools``,
budget) are refused before any work; another ``--seeds`` reuses the finished cells.

    python experiments/transfer.py --data-root ../shared/data --pools runs/converge \\
        --transfer-config experiments/configs/transfer.yaml --out runs/experiments/transfer
    python experiments/transfer.py --held-out mnist-colorize npz:my_task.npz ...
    python experiments/transfer.py --report-only --out runs/experiments/transfer
    python experiments/transfer.py --quick
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filelock import FileLock, Timeout  # noqa: E402

from experiments.common import (  # noqa: E402
    QUICK_MODEL,
    cell,
    check_options,
    command_line,
    markdown_table,
    mean_std,
    parser,
    refuse_other_options,
    seeds,
    write_results,
)
from modnet import io  # noqa: E402
from modnet.commands._options import read_config  # noqa: E402
from modnet.errors import ConfigError, RunDirError  # noqa: E402
from modnet.train import TrainConfig, train, transfer  # noqa: E402
from modnet.train.api import nearest_source  # noqa: E402

DATASETS = ["mnist", "fashion_mnist", "usps", "mnist_m", "cifar10"]
POOL_CONFIG = Path(__file__).resolve().parent / "configs" / "converged_pool.yaml"
QUICK_DATASETS = ["synth_color-bg", "synth_position", "synth_shape"]
QUICK_HELD_OUT = ["synth_shape"]
QUICK_POOL = dict(
    model="modnet_conv_tiny",
    model_kwargs=QUICK_MODEL,
    epochs=1,
    train_limit=256,
    test_limit=64,
    batch_size=32,
    lr=1e-2,
    route_lr=5e-2,
)
QUICK_TRANSFER = dict(epochs=1, train_limit=128, test_limit=64)
TRANSFER_BUDGET = dict(epochs=3, train_limit=2000, test_limit=2000)
SCRATCH = "scratch"
# slug: (name in the tables, transfer options; None: trained from scratch)
METHODS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "head": ("head only (linear probe)", dict(parts="head")),
    "route": ("route only (from the nearest task's route)", dict(parts="route")),
    "route-uniform": ("route only (from uniform)", dict(parts="route", route_init="uniform")),
    "route-head": ("route + head", dict(parts="route,head")),
    "route-head-norm": ("route + head + norm statistics", dict(parts="route,head,norm")),
    "aniso-route-head": ("anisotropic route + head", dict(parts="route,head", route="anisotropic")),
    "grow1": ("route + head + norm, 1 new template", dict(parts="route,head,norm", grow=1)),
    "grow2": ("route + head + norm, 2 new templates", dict(parts="route,head,norm", grow=2)),
    "full": ("full fine-tuning", dict(parts="all", update_shared=True)),  # in a copy
    SCRATCH: ("same network from scratch, held-out task alone", None),
}  # fmt: skip


def slug(spec: str) -> str:
    """A folder name for a dataset spec (``npz:/a/b.npz`` -> ``npz_b``)."""
    scheme, _, rest = spec.partition(":")
    if rest and scheme in ("npz", "folder"):
        spec = f"{scheme}_{Path(rest.rstrip('/')).stem}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec)


# What ``--report-only`` reads: every other option steers measuring.
REPORT_OPTIONS = ("out", "report_only", "quick")


def options(argv) -> Any:
    resolved = "the --transfer-config's, else {} ({} with --quick); transfers only, not pools"
    p = parser(
        "Claim 2, leave one out: transfer to held-out tasks",
        "runs/experiments/transfer",
        {
            key: resolved.format(TRANSFER_BUDGET[key], QUICK_TRANSFER[key])
            for key in ("epochs", "train_limit")
        },
    )
    p.set_defaults(seeds=[0, 1, 2])
    p.add_argument("--datasets", nargs="+", help=f"pool datasets (default: {' '.join(DATASETS)})")
    p.add_argument(
        "--held-out",
        nargs="+",
        help="held-out task specs (default: each of --datasets); one not in --datasets "
        "(e.g. mnist-colorize, npz:PATH, folder:DIR) gets a pool trained on all of them",
    )
    p.add_argument(
        "--pool-config",
        help="YAML of training options for the pools (default: experiments/configs/"
        "converged_pool.yaml; with --quick a tiny synthetic pool)",
    )
    p.add_argument(
        "--transfer-config",
        help="YAML of training options overriding the pool's for transfers; --epochs, "
        "--train-limit and --test-limit override its budget (default budget: 3 epochs, "
        "2000 training and 2000 test images per task; with --quick 1, 128 and 64)",
    )
    p.add_argument("--pools", help="folder of the pool runs (default: <out>/pools)")
    p.add_argument(
        "--missing-pools",
        choices=["train", "wait"],
        default="train",
        help="a pool that is not finished: train it here (default), or wait until another "
        "process has trained it",
    )
    p.add_argument(
        "--test-limit",
        type=int,
        default=None,
        help="test images per task (default: the --transfer-config's, else 2000 (64 with --quick))",
    )
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset of the methods")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables")
    args = p.parse_args(argv)
    if args.report_only:  # the tables come from the cells as they were measured
        given = [
            k for k, v in vars(args).items() if k not in REPORT_OPTIONS and v != p.get_default(k)
        ]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            them = "it" if len(given) == 1 else "them"
            p.error(
                f"--report-only rebuilds the tables from the cells under --out as they were "
                f"measured; {flags} would not apply: leave {them} out"
            )
    if args.report_only and not any((Path(args.out) / "cells").glob("*/*-seed*.json")):
        p.error(
            f"--report-only found no measured cells under --out {args.out}: run the experiment "
            "without --report-only first, or point --out at its folder"
        )
    args.datasets = args.datasets or (QUICK_DATASETS if args.quick else DATASETS)
    args.held_out = args.held_out or (QUICK_HELD_OUT if args.quick else list(args.datasets))
    args.methods = args.methods or list(METHODS)
    args.pools = Path(args.pools) if args.pools else Path(args.out) / "pools"
    # The budget: a flag, else the --transfer-config's value, else the default.
    extra = read_config(args.transfer_config) if args.transfer_config else {}
    for key, default in (QUICK_TRANSFER if args.quick else TRANSFER_BUDGET).items():
        if getattr(args, key) is None:
            setattr(args, key, extra.get(key, default))
    return args


def pool_values(args) -> dict[str, Any]:
    """The pools' training options: ``--pool-config`` (or the built-in) file's."""
    if args.pool_config is None and args.quick:
        values = dict(QUICK_POOL)
    else:
        values = read_config(args.pool_config or POOL_CONFIG)
    return {**values, "data_root": args.data_root, "progress": False}


def make_config(values: dict[str, Any], what: str) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{what} has unknown training options {unknown}: remove them")
    return TrainConfig(**values)


def budget(args) -> dict[str, int]:
    """The transfer budget ``options`` resolved: epochs, training and test images."""
    return {key: getattr(args, key) for key in TRANSFER_BUDGET}


def transfer_values(args, pool: dict[str, Any]) -> dict[str, Any]:
    extra = read_config(args.transfer_config) if args.transfer_config else {}
    return {**pool, **extra, **budget(args), "tasks": []}


# ------------------------------------------------------------------------------ pools
def pool_plan(args, held_out: str) -> tuple[Path, list[str]]:
    if held_out in args.datasets:
        return args.pools / f"loo-{slug(held_out)}", [d for d in args.datasets if d != held_out]
    return args.pools / "pool-all", list(args.datasets)


def finished(run_dir: Path) -> bool:
    if not io.is_run_dir(run_dir):
        return False
    latest = io.latest_checkpoint(run_dir)
    recorded = io.read_results(run_dir).get("train", {})
    return latest is not None and recorded.get("checkpoint") == latest.name


def ready_pool(args, held_out: str, pool: dict[str, Any]) -> Path | None:
    """The held-out task's pool, trained if needed; None while another process trains it."""
    run_dir, tasks = pool_plan(args, held_out)
    if not finished(run_dir) and args.missing_pools == "wait":
        return None
    if not finished(run_dir):
        print(f"training the pool {run_dir} on {', '.join(tasks)}", flush=True)
        try:
            train(make_config({**pool, "tasks": tasks}, "the pool config"), run_dir)
        except RunDirError as error:
            if "being written by another process" in str(error):
                print(f"{run_dir} is being trained by another process: later", flush=True)
                return None
            raise
    _, manifest = io.load_model(run_dir)
    stored = sorted(manifest["tasks"][n].get("dataset", n) for n in manifest["tasks"])
    if stored != sorted(tasks):
        raise RunDirError(
            f"the pool {run_dir} holds the tasks {stored}, not {sorted(tasks)}: pass the "
            "--datasets it was trained on, or another --pools"
        )
    return run_dir


def pool_facts(run_dir: Path) -> dict[str, Any]:
    _, manifest = io.load_model(run_dir)
    state = io.load_trainer_state(io.latest_checkpoint(run_dir)) or {}
    config = json.loads(state.get("config", "{}"))
    return dict(
        run=str(run_dir),
        accuracy=io.read_results(run_dir)["train"]["accuracy"],
        seed=config.get("seed", 0),
        epochs=config.get("epochs"),
    )


def copy_pool(pool: Path, run_dir: Path) -> None:
    """A new run holding the pool's latest checkpoint (the pool run is only read)."""
    model, manifest = io.load_model(pool)
    info = {
        n: {k: t[k] for k in ("dataset", "transform") if k in t}
        for n, t in manifest["tasks"].items()
    }
    extra = {k: v for k, v in manifest.items() if k == "model_name"}
    io.save_checkpoint(run_dir, "pool", model, task_info=info, extra=extra)


# ------------------------------------------------------------------------------ cells
def cell_path(out: Path, held_out: str, method: str, seed: int) -> Path:
    return out / "cells" / slug(held_out) / f"{method}-seed{seed}.json"


def nearest(args, held_out: str, seed: int, pool_dir: Path, config: TrainConfig) -> dict:
    """The nearest source, as ``init_from="nearest"`` chooses it: once per held-out task and seed.

    Choosing loads every source dataset; done once, it is cached next to the cells
    with the budget it read the data with (another budget is refused, as a cell's).
    """
    path = Path(args.out) / "nearest" / slug(held_out) / f"seed{seed}.json"
    if not path.is_file():
        name, distances = nearest_source(pool_dir, held_out, config)
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(path, dict(nearest=name, source_distances=distances, budget=budget(args)))
    recorded = json.loads(path.read_text())
    refuse_other_options(path, recorded.get("budget", {}), budget(args))
    return recorded


def run_cell(args, held_out, method, seed, pool_dir, facts, values) -> dict[str, Any] | None:
    """Trains one (held-out, method, seed) cell and caches it; None if another process has it."""
    path = cell_path(Path(args.out), held_out, method, seed)
    if path.is_file():
        return cached_cell(path, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    try:
        if path.is_file():  # finished by another process meanwhile
            return cached_cell(path, args)
        run_dir = Path(args.out) / "runs" / slug(held_out) / f"{method}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # what a killed attempt left
        config = make_config({**values, "seed": seed}, "the transfer config")
        options = METHODS[method][1]
        start = time.perf_counter()
        if options is None:
            result = train(dataclasses.replace(config, tasks=[held_out]), run_dir)
            recorded: dict[str, Any] = {}
        else:
            recorded = nearest(args, held_out, seed, pool_dir, config)
            copy_pool(pool_dir, run_dir)
            init = recorded["nearest"]
            result = transfer(run_dir, held_out, config=config, init_from=init, **options)
        wall = time.perf_counter() - start
        task = next(iter(result.accuracy))
        entry = dict(
            held_out=held_out,
            task=task,
            method=method,
            seed=seed,
            accuracy=result.accuracy[task],
            trained_parameters=result.trained_parameters,
            wall_s=round(wall, 2),
            nearest=recorded.get("nearest"),
            source_distances=recorded.get("source_distances"),
            pool=facts,
            budget={key: getattr(config, key) for key in TRANSFER_BUDGET},
        )
        io.write_json(path, entry)
        return entry
    finally:
        lock.release()


def cached_cell(path: Path, args) -> dict[str, Any]:
    """A cached cell, refused when it was measured with another budget.

    Cells written before ``test_limit`` was recorded are compared on the rest.
    """
    entry = json.loads(path.read_text())
    refuse_other_options(path, entry.get("budget", {}), budget(args))
    return entry


def cell_options(args, pool: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """What every cell under ``--out`` depends on, besides its held-out task, method
    and seed (one cell per seed: another ``--seeds`` reuses the finished ones): the
    transfer options, the folder of the pools and the options that train them
    (``pool.<option>``), complete as ``TrainConfig`` resolves them."""
    transfer_options = make_config(values, "the transfer config").result_options()
    pool_options = make_config({**pool, "tasks": list(args.datasets)}, "the pool config")
    out, pools = Path(args.out).resolve(), args.pools.resolve()
    where = str(pools.relative_to(out)) if pools.is_relative_to(out) else str(pools)
    return {
        **{k: v for k, v in transfer_options.items() if k not in ("seed", "tasks")},
        "pools": where,  # relative when inside --out: a moved --out keeps its pools
        **{f"pool.{k}": v for k, v in pool_options.result_options().items()},
    }


def check_options_of_out(args, pool: dict[str, Any], values: dict[str, Any]) -> None:
    """Records the options of ``--out``'s cells in ``--out/options.json`` the first
    time; refuses, before any work, other options later, and an ``--out`` holding
    cells, nearest sources or pools but no record (made before options were recorded)."""
    out = Path(args.out)
    cached = (
        any((out / "cells").glob("*/*-seed*.json"))
        or any((out / "nearest").glob("*/seed*.json"))
        or ((out / "pools").is_dir() and any((out / "pools").iterdir()))
    )
    check_options(out / "options.json", cell_options(args, pool, values), out, cached)


def check_cached(args) -> None:
    """Refuses, before any pool trains, the cached cells and nearest sources this run
    would read back when they were measured with another budget."""
    out = Path(args.out)
    for held_out in args.held_out:
        for seed in seeds(args):
            paths = [cell_path(out, held_out, method, seed) for method in args.methods]
            paths.append(out / "nearest" / slug(held_out) / f"seed{seed}.json")
            for path in paths:
                if path.is_file():
                    cached_cell(path, args)


def run_held_out(args, held_out, pool_dir, pool, values) -> int:
    """Every missing cell of one held-out task; the number left to other processes."""
    facts = pool_facts(pool_dir)
    busy = 0
    for seed in seeds(args):
        for method in args.methods:
            cached = cell_path(Path(args.out), held_out, method, seed).is_file()
            entry = run_cell(args, held_out, method, seed, pool_dir, facts, values)
            if entry is None:
                busy += 1
            elif not cached:
                near = f", nearest {entry['nearest']}" if entry["nearest"] else ""
                print(
                    f"{held_out:>14} | {method:<16} | seed {seed} | "
                    f"{100 * entry['accuracy']:5.1f} % | {entry['trained_parameters']:>9,} "
                    f"trained | {entry['wall_s']:7.1f} s{near}",
                    flush=True,
                )
    return busy


# ------------------------------------------------------------------------------ report
def load_cells(out: Path) -> list[dict[str, Any]]:
    """Every cached cell under ``out`` (other files there are left alone)."""
    cells = []
    for path in sorted((out / "cells").glob("*/*-seed*.json")):
        entry = json.loads(path.read_text())
        if isinstance(entry, dict) and entry.get("method") in METHODS and "held_out" in entry:
            cells.append(entry)
    return cells


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def budget_text(cells: list[dict[str, Any]]) -> str:
    """The transfer budgets the cells were measured with, in words."""
    budgets = []
    for c in cells:
        spent = c.get("budget", {})
        words = [plural(spent["epochs"], "epoch")] if "epochs" in spent else []
        if spent.get("train_limit"):
            words.append(f"{spent['train_limit']:,} training images")
        if spent.get("test_limit"):
            words.append(f"{spent['test_limit']:,} test images")
        budgets.append(", ".join(words) or "not recorded")
    return "; ".join(dict.fromkeys(budgets))


def report(args, argv) -> dict[str, Any]:
    out = Path(args.out)
    cells = load_cells(out)
    held = list(dict.fromkeys(c["held_out"] for c in cells))
    data: dict[str, Any] = {"held_out": {}, "methods": {m: METHODS[m][0] for m in METHODS}}
    sections = []
    summary = []
    for spec in held:
        mine = [c for c in cells if c["held_out"] == spec]
        pool = mine[0]["pool"]
        rows, by_method = [], {}
        for method in METHODS:
            got = [c for c in mine if c["method"] == method]
            if not got:
                continue
            accuracy = [c["accuracy"] for c in got]
            by_method[method] = dict(
                accuracy=accuracy,
                seeds=[c["seed"] for c in got],
                trained_parameters=got[0]["trained_parameters"],
                wall_s=mean_std([c["wall_s"] for c in got])[0],
            )
            rows.append(
                [METHODS[method][0], cell(accuracy), f"{got[0]['trained_parameters']:,}",
                 f"{by_method[method]['wall_s']:.1f}"]
            )  # fmt: skip
        nearest = sorted({c["nearest"] for c in mine if c.get("nearest")})
        source = ", ".join(f"{t} {100 * a:.1f} %" for t, a in pool["accuracy"].items())
        task_seeds = sorted({c["seed"] for c in mine})
        sections += [
            f"## Held out: `{spec}`",
            f"Pool `{Path(pool['run']).name}` (trained on {', '.join(pool['accuracy'])}; "
            f"{plural(pool['epochs'], 'epoch')}, pool seed {pool['seed']}, fixed) scores on its "
            f"own tasks: {source}. Transfer budget: {budget_text(mine)}. "
            f"Nearest source task chosen without labels: {', '.join(nearest) or '-'}. "
            f"Accuracy in %, mean ± std over transfer seeds {task_seeds}; wall time per run.",
            markdown_table(["method", "accuracy (%)", "trained parameters", "wall time (s)"], rows),
        ]
        data["held_out"][spec] = dict(
            task=mine[0]["task"], pool=pool, nearest=nearest, methods=by_method
        )
        summary.append(
            [f"`{spec}`"]
            + [cell(by_method[m]["accuracy"]) if m in by_method else "-" for m in METHODS]
        )
    header = ["held out", *METHODS]
    legend = "; ".join(f"`{m}`: {name}" for m, (name, _) in METHODS.items())
    sections = [
        "## Summary: accuracy (%) per held-out task and method",
        "The pool seed is fixed; the ± is over transfer seeds (new head, route and data "
        "order). Every transfer starts from the nearest source task's route and norm "
        "statistics (chosen without labels) in a copy of the pool. Columns: " + legend + ".",
        markdown_table(header, summary),
        *sections,
    ]
    write_results(
        out, "Leave-one-out transfer by adjusting the order of computation", sections, data,
        command_line(__file__, argv),
    )  # fmt: skip
    print(markdown_table(header, summary))
    return data


def main(argv=None) -> dict[str, Any]:
    args = options(argv)
    if not args.report_only:
        pool = pool_values(args)
        make_config({**pool, "tasks": list(args.datasets)}, "the pool config")  # check first
        values = transfer_values(args, pool)
        make_config(values, "the transfer config")
        check_cached(args)
        check_options_of_out(args, pool, values)
        waiting = list(args.held_out)
        while waiting:
            later = []
            for held_out in waiting:
                try:
                    pool_dir = ready_pool(args, held_out, pool)
                except RunDirError as error:  # the other held-out tasks still run
                    print(f"skipping {held_out}: {error}", flush=True)
                    continue
                if pool_dir is None or run_held_out(args, held_out, pool_dir, pool, values):
                    later.append(held_out)
            if later:
                print(f"waiting for other processes on {', '.join(later)}", flush=True)
                time.sleep(1 if args.quick else 60)
            waiting = later
    return report(args, argv)


if __name__ == "__main__":
    main()
