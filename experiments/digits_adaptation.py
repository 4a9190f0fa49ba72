"""Unsupervised multi-source adaptation on digits by re-routing a trained pool.

One table per target domain: source-only baselines (each source; the nearest
source, picked without target labels; the sources' average route), norm
statistics only, every adaptation objective with the route only, with route and
norm statistics, and with an anisotropic route and norm statistics, and two
upper bounds trained WITH the target's labels (``modnet.train.transfer``: route,
head and statistics; and full fine-tuning), so the share of the gap each
unsupervised method closes is visible. Every method adapts its own copy of the
trained pool (``--pool``, never written to); the pool is trained once (its seed
fixed), the adaptation seeds vary.

Every (target, seed, method) cell is cached as JSON under ``OUT/cells/``: a
killed run resumes at the first missing cell, and ``--report`` rewrites the
tables and figures from the cache alone. Besides accuracy, each adaptation
records the target's accuracy on a fixed test sample every ``--curve-every``
steps, and a diagnosis of why routes do not move (``modnet.adapt.diagnose``).

Writes ``OUT/TARGET/results.md`` and ``results.json`` (mean ± std over seeds),
``OUT/TARGET/curves.png`` (accuracy as adaptation proceeds) and
``OUT/TARGET/routes.png`` (the target's route before and after, next to the
sources').

Usage::

    python experiments/digits_adaptation.py --pool RUN_DIR --target mnist_m \\
        --sources mnist,usps --data-root ../shared/data
    python experiments/digits_adaptation.py --quick --synthetic

Without ``--pool`` the sources are trained first (into ``OUT/pool``, their
options recorded in ``OUT/pool-options.json``). A cache or pool made with other
options is refused before any work: pass another ``--out``.
``--synthetic`` runs the same flow on the built-in synthetic suite (no data
needed); ``--quick`` is a one-seed smoke run of a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    HelpFormatter,
    cell,
    check_options,
    markdown_table,
    write_results,
)
from modnet import io  # noqa: E402
from modnet.adapt import (  # noqa: E402
    OBJECTIVES,
    adapt,
    add_target_task,
    diagnose_objectives,
    source_distances,
)
from modnet.adapt.figures import save_accuracy_curves  # noqa: E402
from modnet.plot import read_metrics, route_heatmap, route_matrix  # noqa: E402
from modnet.train import TrainConfig, evaluate, load_data, train, transfer  # noqa: E402

GRADIENT_OBJECTIVES = [n for n, c in OBJECTIVES.items() if c.uses_gradients]
# Digit sources of each target among the tasks of a leave-one-out pool.
TARGET_SOURCES = {"mnist_m": ["mnist", "usps"], "usps": ["mnist", "mnist_m"]}


@dataclass
class Setup:
    """One experiment: domains, model (when the pool is trained here) and budget."""

    sources: list[str]
    target: str
    model_kwargs: dict[str, Any]
    train_limit: int
    test_limit: int
    source_epochs: int
    adapt_epochs: int
    batch_size: int
    seeds: list[int]
    objectives: list[str] = field(default_factory=lambda: list(GRADIENT_OBJECTIVES))
    lr: float = 3e-3
    route_lr: float = 3e-2
    init: str = "nearest"
    upper_epochs: int = 0  # 0: as many as adaptation
    curve_every: int = 10
    curve_sample: int = 500
    pool_seed: int = 0
    variants: list[str] = field(default_factory=lambda: ["route", "route+norm", "aniso+norm"])
    upper: list[str] = field(default_factory=lambda: ["route,head,norm", "all"])


DIGITS = Setup(
    sources=["mnist", "usps"],
    target="mnist_m",
    model_kwargs=dict(
        depth=8, width=32, exp_ratio=4.0, img_size=32, num_templates=4, stem_stride=4
    ),
    train_limit=5000,
    test_limit=2000,
    source_epochs=12,
    adapt_epochs=3,
    batch_size=64,
    seeds=[0, 1, 2],
    curve_every=20,
    curve_sample=500,
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
    init="average",
)
VARIANTS = {  # method suffix -> (what trains, anisotropic route)
    "route": ("route", False),
    "route+norm": ("route,norm", False),
    "aniso+norm": ("route,norm", True),
}
VARIANT_WORDS = {
    "route": "route only",
    "route+norm": "route + norm statistics",
    "aniso+norm": "anisotropic route + norm statistics",
}


def quick(setup: Setup) -> Setup:
    """One seed, few images, few epochs: a smoke run of the whole flow."""
    return replace(
        setup,
        train_limit=min(setup.train_limit, 400),
        test_limit=min(setup.test_limit, 200),
        source_epochs=min(setup.source_epochs, 3),
        adapt_epochs=min(setup.adapt_epochs, 2),
        seeds=setup.seeds[:1],
        curve_every=3,
        curve_sample=100,
    )


def methods(setup: Setup) -> list[str]:
    """Cell names of one (target, seed) that this invocation runs, in table order."""
    names = ["norm_stats"]
    names += [f"{o}/{v}" for o in setup.objectives for v in setup.variants]
    return names + [f"labels/{parts}" for parts in setup.upper]


def all_methods(setup: Setup) -> list[str]:
    """Every cell name the tables show when cached: this invocation's and the built-in ones."""
    full = replace(setup, objectives=GRADIENT_OBJECTIVES, variants=list(VARIANTS))
    names = methods(full)
    return names + [n for n in methods(setup) if n not in names]


# ------------------------------------------------------------------------ cells
RESULT_FIELDS = (  # options that change what a cell computes (not which cells run)
    "sources", "adapt_epochs", "upper_epochs", "lr", "route_lr", "init", "curve_every",
    "curve_sample", "batch_size", "train_limit", "test_limit",
)  # fmt: skip


class Cells:
    """The per-cell JSON cache of one output folder."""

    def __init__(self, out: Path, target: str):
        self.root = out / "cells" / target

    def check(self, setup: Setup, pool: Path | None) -> None:
        """Records the options of the cache; refuses other options on a cache that has them."""
        options = {k: getattr(setup, k) for k in RESULT_FIELDS}
        options["pool"] = str(pool.resolve()) if pool is not None else None
        check_options(self.root / "options.json", options)

    def recorded(self) -> bool:
        return (self.root / "options.json").is_file()

    def path(self, seed: int, name: str) -> Path:
        return self.root / f"seed{seed}" / (name.replace("/", "__").replace(",", "-") + ".json")

    def get(self, seed: int, name: str) -> dict[str, Any] | None:
        path = self.path(seed, name)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, seed: int, name: str, record: dict[str, Any]) -> None:
        path = self.path(seed, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        io.write_json(path, record)


class Runner:
    """Runs the missing cells of one target on copies of one trained pool."""

    def __init__(self, setup: Setup, pool: Path, out: Path, base: TrainConfig, keep: bool):
        self.setup, self.pool, self.out, self.keep = setup, pool, out, keep
        self.cells = Cells(out, setup.target)
        self.model, self.manifest = io.load_model(pool)
        missing = [s for s in setup.sources if s not in self.model.task_names]
        if missing:
            raise SystemExit(
                f"error: the pool {pool} has no task {missing}: --sources are tasks of the pool, "
                f"one of {self.model.task_names}"
            )
        self.base = base
        specs = [self.manifest["tasks"][s]["dataset"] for s in setup.sources] + [setup.target]
        loaded = load_data(specs, self.model, base)  # one data seed (the pool's) for every cell
        self.preloaded = dict(zip(specs, loaded.values(), strict=True))
        self.source_data = {
            s: self.preloaded[self.manifest["tasks"][s]["dataset"]] for s in setup.sources
        }
        self.target_data = self.preloaded[setup.target]
        self.name = self.target_data.name

    def run(self, seed: int, progress: bool) -> None:
        baseline = self.cells.get(seed, "baseline")
        if baseline is None:
            baseline = self._timed(lambda: self.baseline(seed))
            self.cells.put(seed, "baseline", baseline)
            _say(f"[{self.name} seed {seed}] baseline: {baseline['seconds']:.0f} s")
        for name in methods(self.setup):
            if self.cells.get(seed, name) is not None:
                continue
            record = self._timed(lambda n=name: self.method(seed, n, baseline, progress))
            self.cells.put(seed, name, record)
            _say(
                f"[{self.name} seed {seed}] {name}: {100 * record['accuracy']:.1f} % "
                f"({record['seconds']:.0f} s)"
            )

    def _timed(self, fn) -> dict[str, Any]:
        start = time.perf_counter()
        record = fn()
        record["seconds"] = time.perf_counter() - start
        return record

    def config(self, seed: int, epochs: int) -> TrainConfig:
        return replace(self.base, epochs=epochs, seed=seed, tasks=[])

    # ------------------------------------------------------------------ baseline
    @torch.no_grad()
    def baseline(self, seed: int) -> dict[str, Any]:
        """Source-only accuracies, the nearest source, the routes, and the diagnosis."""
        setup, model, target = self.setup, self.model, self.target_data
        model.eval()
        device = torch.device("cpu")
        micro = self.base.eval_micro_batch
        batch = self.base.eval_batch_size
        sources = {s: target for s in setup.sources}
        source_only = evaluate(model, sources, batch, device, micro_batch=micro)
        own = evaluate(model, self.source_data, batch, device, micro_batch=micro)
        distances = source_distances(model, self.source_data, target, seed=seed)
        nearest = min(distances, key=distances.__getitem__)
        record = dict(
            source_only=source_only,
            source_accuracy=own,
            source_distances=distances,
            nearest=nearest,
            routes={s: route_matrix(model, s).tolist() for s in setup.sources},
            diagnosis={},
        )
        for start in ("average", nearest):
            add_target_task(model, self.name, target.num_classes, setup.sources, init=start)
            try:
                accuracy = evaluate(model, {self.name: target}, batch, device, micro_batch=micro)
                key = "average" if start == "average" else "nearest"
                record[f"{key}_accuracy"] = accuracy[self.name]
                with torch.enable_grad():
                    record["diagnosis"][key] = diagnose_objectives(
                        model,
                        self.name,
                        self.source_data,
                        target,
                        GRADIENT_OBJECTIVES,  # all: a later run may add objectives
                        setup.route_lr,
                        seed=seed,
                        start=start,
                    )
            finally:
                model.delete_task(self.name)
        return record

    # ------------------------------------------------------------------ methods
    def method(self, seed: int, name: str, baseline: dict[str, Any], progress: bool):
        run_dir = self.out / "runs" / self.setup.target / f"seed{seed}" / name.replace("/", "__")
        if run_dir.exists():  # a cell killed half way starts again
            shutil.rmtree(run_dir)
        shutil.copytree(self.pool, run_dir, ignore=shutil.ignore_patterns(".lock", ".lock.info"))
        try:
            if name.startswith("labels/"):
                return self._upper(seed, name.split("/", 1)[1], baseline, run_dir, progress)
            return self._adapt(seed, name, run_dir, progress)
        finally:
            if not self.keep:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _adapt(self, seed: int, name: str, run_dir: Path, progress: bool) -> dict[str, Any]:
        setup = self.setup
        objective, _, variant = name.partition("/")
        parts, anisotropic = VARIANTS.get(variant, ("norm", False))
        result = adapt(
            run_dir,
            setup.target,
            sources=list(setup.sources),
            objective=objective,
            parts=parts,
            init=setup.init,
            config=replace(self.config(seed, setup.adapt_epochs), progress=progress),
            preloaded=self.preloaded,
            anisotropic=anisotropic,
            curve_every=setup.curve_every,
            curve_sample=setup.curve_sample,
        )
        start = result.extra.get("start")
        final = route_matrix(result.model, result.target)
        trace = result.loss_trace
        return dict(
            accuracy=result.accuracy,
            start_accuracy=result.start_accuracy,
            init=result.init,
            source_accuracy=result.source_accuracy,
            trained_parameters=result.trained_parameters,
            auxiliary_parameters=result.auxiliary_parameters,
            adapted_statistics=result.adapted_statistics,
            first_loss=trace[0] if trace else None,
            last_loss=trace[-1] if trace else None,
            relation={
                k: {m: v[m] for m in ("cosine", "tv")} for k, v in result.relation["to"].items()
            },
            curve=result.curve,
            route=final.tolist(),
            start_route=start,
        )

    def _upper(self, seed, parts, baseline, run_dir: Path, progress: bool) -> dict[str, Any]:
        epochs = self.setup.upper_epochs or self.setup.adapt_epochs
        config = replace(self.config(seed, epochs), progress=progress)
        result = transfer(  # in this cell's copy of the pool: "all" may change the sources
            run_dir,
            self.setup.target,
            parts,
            config=config,
            init_from=baseline["nearest"],
            update_shared=True,
        )
        steps = [
            dict(step=r["step"], accuracy=r["accuracy"][self.name])
            for r in read_metrics(run_dir / "metrics.jsonl")
            if r.get("phase") == f"transfer-{self.name}" and self.name in (r.get("accuracy") or {})
        ]
        # Trained on a training subset drawn with this seed; measured, like every other
        # row, on the test subset drawn with the pool's seed, normalised as it was trained.
        transform = io.load_model(run_dir)[1]["tasks"][self.name]["transform"]
        test = {self.name: self.target_data.with_normalization(transform["mean"], transform["std"])}
        accuracy = evaluate(result.model, test, self.base.eval_batch_size, torch.device("cpu"))
        return dict(
            accuracy=accuracy[self.name],
            own_split_accuracy=result.accuracy[self.name],
            init=baseline["nearest"],
            trained_parameters=result.trained_parameters,
            curve=steps,
            route=route_matrix(result.model, self.name).tolist(),
        )


def _say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------- tables
def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def load_cells(out: Path, setup: Setup) -> dict[int, dict[str, dict[str, Any]]]:
    """Every cached cell of ``setup.target``: seed -> cell name -> record (finished seeds)."""
    cells = Cells(out, setup.target)
    found = {}
    for seed in setup.seeds:
        records = {n: cells.get(seed, n) for n in ["baseline", *all_methods(setup)]}
        records = {k: v for k, v in records.items() if v is not None}
        if "baseline" in records:
            found[seed] = records
    return found


def tables(setup: Setup, found: dict[int, dict[str, dict[str, Any]]]) -> list[str]:
    """Accuracy table, route movement and the diagnosis of one target, from the cache."""
    seeds = sorted(found)
    base = [found[s]["baseline"] for s in seeds]
    start_key = "nearest" if setup.init == "nearest" else "average"
    start = _mean(b[f"{start_key}_accuracy"] for b in base)
    full = [found[s].get("labels/all") for s in seeds]
    full_mean = _mean(r["accuracy"] for r in full if r)

    def gap(accuracy: float) -> str:
        if full_mean != full_mean or abs(full_mean - start) < 1e-9:
            return ""
        return f"{100 * (accuracy - start) / (full_mean - start):+.0f} %"

    picks = ", ".join(sorted({b["nearest"] for b in base}))
    rows: list[list[Any]] = []
    for s in setup.sources:
        rows.append([f"source-only: {s} (its route, head, statistics)",
                     cell([b["source_only"][s] for b in base]), "", 0, ""])  # fmt: skip
    rows.append(["source-only: best single source (picked WITH target labels)",
                 cell([max(b["source_only"].values()) for b in base]), "", 0, ""])  # fmt: skip
    rows.append([f"source-only: nearest source, picked without labels ({picks})",
                 cell([b["nearest_accuracy"] for b in base]), "", 0, ""])  # fmt: skip
    rows.append(["source-only: the sources' average route, head and statistics",
                 cell([b["average_accuracy"] for b in base]), "", 0, ""])  # fmt: skip
    for name in all_methods(setup):
        runs = [found[s][name] for s in seeds if name in found[s]]
        if not runs:
            continue
        accuracy = _mean(r["accuracy"] for r in runs)
        count = f"{runs[0]['trained_parameters']:,}"
        if runs[0].get("auxiliary_parameters"):
            count += f" (+{runs[0]['auxiliary_parameters']:,} discriminator)"
        if runs[0].get("adapted_statistics"):
            count += f" (+{runs[0]['adapted_statistics']:,} statistics)"
        rows.append([
            _label(name, start_key), cell([r["accuracy"] for r in runs]),
            gap(accuracy), count, f"{_mean(r['seconds'] for r in runs):.0f}",
        ])  # fmt: skip
    sources_line = ", ".join(
        f"{s} {cell([b['source_accuracy'][s] for b in base])}" for s in setup.sources
    )
    accuracy = (
        f"Target {setup.target}: accuracy (%) on its test split (its labels are used only "
        f"there and by the last rows), mean ± std over adaptation seeds {seeds}; the pool "
        f"(sources {', '.join(setup.sources)}) is one run, seed fixed. Adaptation starts at the "
        f"{start_key} source-only model; 'gap closed' is (accuracy - start) / (full fine-tuning "
        f"- start). Time: seconds per cell. The sources on their own test splits: "
        f"{sources_line}.\n\n"
        + markdown_table(
            ["method", "target accuracy", "gap closed", "trained parameters", "time (s)"], rows
        )
    )
    return [accuracy, _movement(setup, found), _diagnosis(setup, found)]


def _label(name: str, start_key: str) -> str:
    if name == "norm_stats":
        return f"norm statistics only (re-estimated on the target; {start_key} start)"
    if name.startswith("labels/"):
        parts = name.split("/", 1)[1]
        words = "full fine-tuning" if parts == "all" else parts.replace(",", " + ")
        return f"WITH target labels: {words} (from the nearest source)"
    objective, _, variant = name.partition("/")
    return f"{objective}: {VARIANT_WORDS[variant]}"


def _movement(setup: Setup, found) -> str:
    rows = []
    for name in all_methods(setup):
        runs = [found[s][name] for s in found if name in found[s] and "relation" in found[s][name]]
        if not runs:
            continue
        refs = [*setup.sources, "average", "start"]
        rows.append([name] + [
            f"{_mean(r['relation'][k]['cosine'] for r in runs):.3f} / "
            f"{_mean(r['relation'][k]['tv'] for r in runs):.3f}"
            for k in refs
        ])  # fmt: skip
    return (
        "How far each adapted route moved: cosine similarity / total-variation distance of "
        "per-layer template shares to each source's route, their average and its own start "
        "(mean over layers and seeds).\n\n"
        + markdown_table(["method", *setup.sources, "average", "start"], rows)
    )


def _diagnosis(setup: Setup, found) -> str:
    rows = []
    seeds = sorted(found)
    for start in ("nearest", "average"):
        reports = [found[s]["baseline"]["diagnosis"][start] for s in seeds]
        route = reports[0]["route"]
        for objective in GRADIENT_OBJECTIVES:
            items = [r["objectives"][objective] for r in reports if objective in r["objectives"]]
            if not items:
                continue
            prefers = sum(i["prefers_start"] for i in items)
            best = ", ".join(sorted({i["best_start"] for i in items}))
            rows.append([
                start, objective, f"{_mean(i['loss'] for i in items):.4g}",
                f"{_mean(i['grad_norm'] for i in items):.2e}",
                f"{_mean(i['grad_to_logits'] for i in items):.2e}",
                f"{_mean(i['sgd_step'] for i in items):.2e}",
                f"{_mean(i['adam_steps_to_move'] for i in items):.0f}",
                f"{route['saturation']:.3f}", f"{prefers}/{len(items)}", best,
            ])  # fmt: skip
    return (
        "Why routes do not move: at each start route, per objective on a fixed batch "
        "(mean over seeds): the objective, its gradient norm on the route logits, that norm "
        "over the logits' norm, the plain-gradient step (route lr x gradient norm), the steps "
        "Adam needs at full speed to move the logits by their own norm, the mean largest "
        "template share per layer (1: one-hot, softmax gradient vanishes), how many seeds "
        "find the objective already lowest at the start, and the start it prefers among the "
        f"sources and their average. Route lr {setup.route_lr}.\n\n"
        + markdown_table(
            [
                "start",
                "objective",
                "value",
                "grad norm",
                "grad / logits",
                "sgd step",
                "adam steps",
                "saturation",
                "prefers start",
                "lowest at",
            ],
            rows,
        )  # fmt: skip
    )


# ---------------------------------------------------------------------- figures
def figures(setup: Setup, found, out: Path) -> list[Path]:
    """Accuracy during adaptation (mean over seeds) and the routes of the first seed."""
    seeds = sorted(found)
    if not seeds:
        return []
    written = []
    panels: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name in all_methods(setup):
        runs = [found[s][name]["curve"] for s in seeds if name in found[s]]
        runs = [r for r in runs if r]
        if not runs or name.startswith("labels/"):
            continue
        length = min(len(r) for r in runs)
        curve = [
            dict(step=runs[0][i]["step"], accuracy=_mean(r[i]["accuracy"] for r in runs))
            for i in range(length)
        ]
        objective, _, variant = name.partition("/")
        panels.setdefault(VARIANT_WORDS.get(variant, "other"), {})[objective] = curve
    base = [found[s]["baseline"] for s in seeds]
    start_key = "nearest" if setup.init == "nearest" else "average"
    references = {f"source-only ({start_key})": _mean(b[f"{start_key}_accuracy"] for b in base)}
    for name, label in (("norm_stats", "norm statistics only"),
                        ("labels/all", "full fine-tuning WITH labels")):  # fmt: skip
        runs = [found[s][name]["accuracy"] for s in seeds if name in found[s]]
        if runs:
            references[label] = _mean(runs)
    if panels:
        written.append(
            save_accuracy_curves(
                panels,
                out / setup.target / "curves.png",
                references,
                f"{setup.target}: target accuracy during adaptation (mean over {len(seeds)} "
                "seed(s), fixed test sample)",
            )
        )
    first = found[seeds[0]]
    matrices = {s: torch.tensor(m) for s, m in first["baseline"]["routes"].items()}
    start = next((r["start_route"] for r in first.values() if r.get("start_route")), None)
    if start is not None:
        matrices["target\nat start"] = torch.tensor(start)
    for name in all_methods(setup):
        wanted = name != "norm_stats" and name != "labels/all"  # their routes do not move
        if name in first and first[name].get("route") and wanted:
            matrices[name.replace("/", "\n")] = torch.tensor(first[name]["route"])
    written.append(
        route_heatmap(
            matrices,
            out / setup.target / "routes.png",
            title=f"{setup.target}: sources' routes and the target's before/after (seed "
            f"{seeds[0]})",
        )
    )
    return written


# ------------------------------------------------------------------------- main
def pool_config(setup: Setup, base: TrainConfig) -> TrainConfig:
    """How the sources are trained when no ``--pool`` is given."""
    return replace(base, tasks=list(setup.sources), epochs=setup.source_epochs)


def pool_finished(pool: Path) -> bool:
    return io.is_run_dir(pool) and (pool / "results.json").is_file()


def check_pool(setup: Setup, base: TrainConfig, out: Path) -> None:
    """Refuses, before any work, a pool in ``out/pool`` trained with other options
    (``out/pool-options.json`` records them)."""
    options = pool_config(setup, base).result_options()
    check_options(out / "pool-options.json", options, out / "pool", pool_finished(out / "pool"))


def train_pool(setup: Setup, base: TrainConfig, out: Path) -> Path:
    """The sources trained once (seed ``pool_seed``) into ``out/pool``; reused when
    finished (``check_pool``: with the same options)."""
    pool = out / "pool"
    if pool_finished(pool):
        return pool
    train(pool_config(setup, base), pool, overwrite=True)
    return pool


def base_config(setup: Setup, pool: Path | None, data_root: str | None) -> TrainConfig:
    """Data and optimiser options: the pool's own (its data seed) when it is given."""
    if pool is not None:
        _, state = io.run_state(pool, repair=False)
        stored = json.loads(state["config"])
        config = TrainConfig.from_dict(stored)
        config = replace(
            config, augment=False, progress=False, lr=setup.lr, route_lr=setup.route_lr
        )
        return replace(config, data_root=data_root or config.data_root)
    return TrainConfig(
        model="modnet_conv_tiny",
        model_kwargs=setup.model_kwargs,
        tasks=list(setup.sources),
        data_root=data_root,
        train_limit=setup.train_limit,
        test_limit=setup.test_limit,
        batch_size=setup.batch_size,
        lr=setup.lr,
        route_lr=setup.route_lr,
        seed=setup.pool_seed,
        progress=False,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--out", default="runs/experiments/digits_adaptation", help="output folder")
    parser.add_argument(
        "--data-root",
        default=os.environ.get("MODNET_DATA_ROOT"),
        help="folder with the digit datasets (default: $MODNET_DATA_ROOT, else the pool's)",
    )
    parser.add_argument("--pool", help="a trained run holding the sources (copied, never written)")
    parser.add_argument("--target", help=f"target dataset spec (default: {DIGITS.target})")
    parser.add_argument(
        "--sources",
        help=f"comma-separated source tasks of the pool (default: {','.join(DIGITS.sources)})",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="the synthetic suite instead (its own defaults: see SYNTHETIC in this file)",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, a tiny budget")
    seeds = " ".join(map(str, DIGITS.seeds))
    parser.add_argument("--seeds", type=int, nargs="+", help=f"adaptation seeds (default: {seeds})")
    parser.add_argument(
        "--objectives", help=f"comma-separated, of {', '.join(GRADIENT_OBJECTIVES)} (default: all)"
    )
    parser.add_argument(
        "--variants",
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: {','.join(DIGITS.variants)})",
    )
    parser.add_argument(
        "--upper",
        help="what the labelled upper bounds train, ';'-separated "
        f"(default: {';'.join(DIGITS.upper)})",
    )
    parser.add_argument(
        "--init",
        help=f"where adaptation starts: nearest, average or a source (default: {DIGITS.init})",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        help=f"adaptation epochs, passes over the target (default: {DIGITS.adapt_epochs})",
    )
    parser.add_argument(
        "--upper-epochs",
        type=int,
        help="epochs of the labelled upper bounds (default: as many as adaptation)",
    )
    parser.add_argument(
        "--route-lr", type=float, help=f"route learning rate (default: {DIGITS.route_lr})"
    )
    parser.add_argument(
        "--curve-every",
        type=int,
        help=f"evaluate the target every N steps (default: {DIGITS.curve_every})",
    )
    parser.add_argument(
        "--curve-sample",
        type=int,
        help=f"test images those evaluations read (default: {DIGITS.curve_sample})",
    )
    parser.add_argument(
        "--train-limit",
        type=int,
        help=f"training images per domain, no --pool (default: {DIGITS.train_limit})",
    )
    parser.add_argument("--report", action="store_true", help="only rewrite tables from the cache")
    parser.add_argument("--keep-runs", action="store_true", help="keep each cell's run directory")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args(argv)
    setup = SYNTHETIC if args.synthetic else DIGITS
    if args.quick:
        setup = quick(setup)
    if args.target:
        setup = replace(setup, target=args.target,
                        sources=TARGET_SOURCES.get(args.target, setup.sources))  # fmt: skip
    overrides = dict(
        seeds=args.seeds,
        objectives=args.objectives and args.objectives.split(","),
        variants=args.variants and args.variants.split(","),
        upper=args.upper and args.upper.split(";"),
        sources=args.sources and args.sources.split(","),
        init=args.init,
        adapt_epochs=args.epochs,
        upper_epochs=args.upper_epochs,
        route_lr=args.route_lr,
        curve_every=args.curve_every,
        curve_sample=args.curve_sample,
        train_limit=args.train_limit,
    )
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    _check(setup)
    out = Path(args.out)
    pool = Path(args.pool) if args.pool else None
    if pool is not None and not (io.is_run_dir(pool) and io.latest_checkpoint(pool)):
        raise SystemExit(f"error: --pool {pool} holds no trained run: train the sources first")
    if not args.report:
        base = base_config(setup, pool, args.data_root)
        if pool is None:  # both checks before any work; the pool is every target's
            check_pool(setup, base, out)
        Cells(out, setup.target).check(setup, pool or out / "pool")
        if pool is None:
            pool = train_pool(setup, base, out)
        runner = Runner(setup, pool, out, base, args.keep_runs)
        for seed in setup.seeds:
            runner.run(seed, args.progress)
    elif Cells(out, setup.target).recorded():  # the command results.md records: the cells'
        Cells(out, setup.target).check(setup, pool or out / "pool")
    found = load_cells(out, setup)
    if not found:
        raise SystemExit(f"error: no cached cell of {setup.target} under {out}/cells")
    argv_text = " ".join(sys.argv[1:] if argv is None else argv)
    command = f"python experiments/digits_adaptation.py {argv_text}".strip()
    sections = tables(setup, found)
    seconds = sum(r.get("seconds", 0) for cells in found.values() for r in cells.values())
    sections.append(f"Compute: {seconds / 60:.1f} min over every cell of this target.")
    written = figures(setup, found, out)
    data = dict(setup=asdict(setup), pool=str(pool) if pool else None, cells=found)
    title = f"Adapting to {setup.target} from {', '.join(setup.sources)} without target labels"
    write_results(out / setup.target, title, sections, data, command)
    for path in written:
        _say(f"figure: {path}")
    _say((out / setup.target / "results.md").read_text())
    return data


def _check(setup: Setup) -> None:
    unknown = [o for o in setup.objectives if o not in GRADIENT_OBJECTIVES]
    if unknown:
        raise SystemExit(f"error: unknown objective(s) {unknown}: use {GRADIENT_OBJECTIVES}")
    unknown = [v for v in setup.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown}: use {list(VARIANTS)}")
    if setup.target in setup.sources:
        raise SystemExit(f"error: the target {setup.target} is also a source: drop it")


if __name__ == "__main__":
    main()
