"""``train`` and ``transfer``: the project's main job, callable from Python or the CLI."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..data import SYNTHETIC_DEFAULT_TASKS, DataError, TaskData, load_task, portable_spec
from ..errors import ConfigError, RunDirError
from ..model import ModularNet
from ..options import check_model_options, create_model
from ..plot import CURVES_PNG, METRICS_FILE, ROUTES_PNG, ROUTES_TXT, save_run_figures
from ..routing import SoftRoute, configured_route
from .config import RESULT_NEUTRAL, TrainConfig
from .distributed import barrier, broadcast_state, init_distributed
from .loop import Trainer
from .parts import (
    ALL_PARTS,
    changed_shared,
    check_shared,
    parse_parts,
    present_parts,
    shown,
)
from .tracking import MetricsLogger

RESULTS_FILE = io.RESULTS_FILE
NEAREST = "nearest"  # init_from: the source task the new task's images look most like
ROUTE_INITS = ("uniform",)
ROUTE_KINDS = ("anisotropic",)
NEAREST_SAMPLE = 512  # images per domain that choose the nearest source


@dataclass
class TrainResult:
    """What a training phase produced."""

    model: ModularNet
    accuracy: dict[str, float]
    run_dir: Path
    checkpoint: Path | None
    trained_parameters: int
    is_main: bool = True


def load_data(specs: list[str], model: ModularNet, config: TrainConfig) -> dict[str, TaskData]:
    """Loads every task at the model's input size and channel count."""
    channels, height, _ = model.pretrained_cfg["input_size"]
    repeated = [spec for spec, n in Counter(s.strip() for s in specs).items() if n > 1]
    if repeated:
        raise ConfigError(f"{repeated[0]!r} is listed twice: list each task once")
    data: dict[str, TaskData] = {}
    given: dict[str, str] = {}
    for spec in specs:
        task = load_task(
            spec,
            img_size=height,
            in_chans=channels,
            root=config.data_root,
            download=config.download,
            train_limit=config.train_limit,
            test_limit=config.test_limit,
            seed=config.seed,
            augment=config.augment,
            in_memory_mb=config.in_memory_mb,
        )
        if task.name in data:
            raise ConfigError(
                f"{given[task.name]!r} and {spec!r} are both task {task.name!r} (a file or folder "
                "task takes its file's or folder's name): rename one of them"
            )
        data[task.name] = task
        given[task.name] = spec
    return data


def _task_info(spec: str, task: TaskData, phase: str) -> dict[str, Any]:
    return {"dataset": portable_spec(spec), "transform": task.transform, "phase": phase}


def check_resume_options(
    run_dir: Path,
    phase: str,
    stored: Mapping[str, Any],
    config: TrainConfig,
    stored_plan: Mapping[str, Any] | None = None,
    plan: Mapping[str, Any] | None = None,
) -> None:
    """Refuses to resume ``phase`` with options that would change what it computes.

    Options in ``RESULT_NEUTRAL`` (progress bar, log frequency, checkpoint frequency,
    evaluation batch size, device, data root) may differ; ``plan`` entries are
    compared where the stored plan has them.

    Raises:
        RunDirError: Listing every changed option, old and new value.
    """
    changed = changed_training_options(stored, config)
    if stored_plan is not None and plan is not None:
        changed += io.changed_options(
            {k: stored_plan.get(k) for k in plan if k in stored_plan},
            {k: v for k, v in plan.items() if k in stored_plan},
        )
    if changed:
        raise RunDirError(
            f"{run_dir} holds an unfinished {phase!r} started with other options "
            f"({'; '.join(changed)}): run it again with its own options to resume, or discard "
            f"it (`modnet discard {run_dir}`) or start afresh elsewhere"
        )


def changed_training_options(stored: Mapping[str, Any] | None, config: TrainConfig) -> list[str]:
    """Options of ``config`` that differ from ``stored`` and can change results."""
    # An option the stored config lacks (added to modnet since) ran at its default.
    stored = {**TrainConfig().to_dict(), **dict(stored or {})}
    return io.changed_options(stored, config.to_dict(), ignore=RESULT_NEUTRAL)


def outputs_missing(run_dir: Path, phase: str, latest: Path, figures: Iterable[str] = ()) -> bool:
    """Whether an output of ``phase`` is missing for its last checkpoint.

    A phase writes its figures, then its results entry: it is complete once
    ``results.json`` names its last checkpoint and every figure is there.

    Args:
        run_dir: The run directory.
        phase: The phase (``"train"``, ``"transfer-<task>"``, ``"adapt-<task>"``).
        latest: The run's last checkpoint.
        figures: The phase's own figures besides the run's (``routes.png``,
            ``routes.txt``, and ``curves.png`` once there are metrics), in ``run_dir``.

    Returns:
        True if the results entry or a figure is missing.
    """
    recorded = io.read_results(run_dir).get(phase, {})
    if not isinstance(recorded, dict) or recorded.get("checkpoint") != latest.name:
        return True
    names = [ROUTES_PNG, ROUTES_TXT, *figures]
    if (run_dir / METRICS_FILE).is_file():  # save_run_figures draws curves from it
        names.append(CURVES_PNG)
    return not all((run_dir / name).is_file() for name in names)


def train(
    config: TrainConfig | None = None, run_dir: str | Path = "runs/train", overwrite: bool = False
) -> TrainResult:
    """Trains a template pool with one route and head per task.

    An interrupted run in ``run_dir`` resumes from its last checkpoint, if it is
    run with the same options (``RESULT_NEUTRAL`` ones may differ); a run whose
    training finished but whose results or figures were not written yet gets them.

    Args:
        config: Options; the default trains ``modnet_conv_tiny`` on the built-in
            synthetic suite.
        run_dir: Output directory (checkpoints, metrics.jsonl, results.json, routes).
        overwrite: Start afresh even if ``run_dir`` holds a run: removes what modnet
            wrote there (only that), without reading it, so a damaged run can be replaced.

    Raises:
        ConfigError: A bad option (before anything is written).
        RunDirError: ``run_dir`` is not a run directory, is being written by another
            process, holds a finished run or an unfinished phase of another kind, or
            an unfinished run with other options.
        DivergenceError: The loss or the weights diverged (nothing non-finite is saved).
    """
    config = config or TrainConfig()
    check_model_options(config.model, config.model_kwargs)
    run_dir = Path(run_dir)
    ctx = init_distributed(config.device)
    io.check_run_target(run_dir)
    fresh = None
    if overwrite or not io.modnet_checkpoints(run_dir):
        # A new run: what can refuse it (a value only the model's construction
        # refuses, data that cannot be loaded) fails before anything is written or,
        # with overwrite, before the old run is removed.
        fresh = _fresh_start(config)
    with io.open_run(run_dir, "modnet train", overwrite=overwrite, enabled=ctx.is_main):
        barrier(ctx)
        return _train(config, run_dir, ctx, fresh)


def _fresh_start(config: TrainConfig) -> tuple[ModularNet, list[str], dict[str, TaskData]]:
    """A new run's model (seeded by ``config.seed``), its dataset specs and their data."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, config.model_kwargs)
    specs = list(config.tasks or SYNTHETIC_DEFAULT_TASKS)
    return model, specs, load_data(specs, model, config)


def _train(config: TrainConfig, run_dir: Path, ctx, fresh=None) -> TrainResult:
    latest, state = io.run_state(run_dir, repair=ctx.is_main)
    io.refuse_other_phase(run_dir, state, "train")
    if latest is not None:
        stored = json.loads(state["config"]) if state and "config" in state else None
        resume = io.unfinished_phase(state) == "train"
        finished_train = state is not None and state.get("phase") == "train" and not resume
        if resume:
            check_resume_options(run_dir, "train", stored, config)
        elif not (
            finished_train
            and outputs_missing(run_dir, "train", latest)
            and not changed_training_options(stored, config)
        ):
            raise RunDirError(
                f"{run_dir} already holds a finished run: choose another --out, or pass "
                "--overwrite (overwrite=True) to replace it"
            )
        model, manifest = io.load_model(latest)
        specs = [manifest["tasks"][n]["dataset"] for n in model.task_names]
        if not resume:
            return _complete_outputs(run_dir, "train", model, state, latest, ctx, ALL_PARTS)
    else:
        state = None
    if state is None:
        model, specs, data = fresh or _fresh_start(config)
        for name, task in data.items():
            model.add_task(name, task.num_classes)
    else:
        data = load_data(specs, model, config)
    model.set_trainable(list(data), ALL_PARTS)
    broadcast_state(model, ctx)
    trainer = Trainer(
        model,
        data,
        config,
        run_dir,
        "train",
        ctx,
        {
            name: _task_info(spec, data[name], "train")
            for spec, name in zip(specs, data, strict=True)
        },
        resume_state=state,
        extra_manifest={"model_name": config.model},
    )
    accuracy = trainer.fit()
    result = TrainResult(
        model, accuracy, run_dir, io.latest_checkpoint(run_dir), len_trained(trainer), ctx.is_main
    )
    if ctx.is_main:
        save_run_figures(model, run_dir)  # first: the phase is complete once its results are
        _record_results(run_dir, "train", result, model)
    return result


def _complete_outputs(
    run_dir: Path,
    phase: str,
    model: ModularNet,
    state: Mapping[str, Any],
    latest: Path,
    ctx,
    parts: frozenset[str],
    tasks: list[str] | None = None,
    plan: Mapping[str, Any] | None = None,
    first_new_chunk: int | None = None,
) -> TrainResult:
    """Writes the outputs of a phase that finished its last checkpoint: its figures,
    the outdated marks of the tasks whose shared parts it trained (see
    ``changed_shared``) and, last, its results."""
    history = json.loads(state.get("history", "[]"))
    accuracy = history[-1]["accuracy"] if history else {}
    trained = tasks or model.task_names
    model.set_trainable(trained, parts, first_new_chunk)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.requires_grad_(False)
    result = TrainResult(model.eval(), accuracy, run_dir, latest, count, ctx.is_main)
    if ctx.is_main:
        save_run_figures(model, run_dir)
        others = [n for n in model.task_names if n not in trained]
        changed_shared(run_dir, phase, parts, others)
        _record_results(run_dir, phase, result, model, extra=plan)
        # the run holds this attempt's weights (a kill may have beaten the trainer's mark)
        MetricsLogger(run_dir, phase).checkpointed(int(state.get("step", 0)))
        io.run.note(f"{phase} had finished training; wrote its missing results in {run_dir}")
    return result


def transfer(
    run_dir: str | Path,
    task: str,
    parts: str = "route,head",
    grow: int = 0,
    config: TrainConfig | None = None,
    init_from: str | None = None,
    overwrite: bool = False,
    route: str | None = None,
    route_init: str | None = None,
    route_options: dict | None = None,
    update_shared: bool = False,
) -> TrainResult:
    """Learns a new task on a trained pool; every existing task stays bit-identical
    (unless ``update_shared``).

    Args:
        run_dir: A run directory from ``train``; the new task is saved into it.
        task: Dataset spec of the new task (e.g. ``cifar10``, ``synth_size``).
        parts: What trains, e.g. ``"route,head"`` (the default: the pool is frozen),
            ``"route,head,templates"`` or ``"all"`` (shared parts: ``update_shared``).
            The new task's norm statistics always learn, as they start empty,
            unless ``init_from`` supplies them and ``norm`` is not listed. Without
            ``head``, the head is copied from ``init_from`` when both have the same
            number of classes.
        grow: Add this many templates that only the new task uses (and trains).
        config: Training options (epochs, lr, data root, ...).
        init_from: Start the route and norm statistics from this existing task, or
            ``"nearest"``: from the task whose network the new task's training images
            look most like, chosen without their labels
            (``modnet.adapt.selection.source_distances`` on 512 images per domain);
            ``results.json`` records the choice (``nearest``) and the distances.
        overwrite: Replace the task if the run already has it from an earlier
            transfer. A task of ``train`` (one the pool was trained with) is never
            replaced: its route and head could not be recovered.
        route: ``None``: a route of the run's kind (a copy of ``init_from``'s);
            ``"anisotropic"``: a soft route with one coefficient per (layer,
            template, parameter tensor), ``[L, K, G]``, starting from the
            coefficients of ``init_from`` (or of ``route_init``) repeated over the
            tensors (Zhmoginov et al. 2021, section 3.2). Needs a soft route to start from.
        route_init: ``None``: the route starts as ``init_from``'s (or the run's default);
            ``"uniform"``: as the uniform mixture of the templates (every coefficient
            1/K), with the normalisation of the run's soft routes; the norm
            statistics still come from ``init_from``.
        route_options: Options of the new task's soft route (``normalize``,
            ``temperature``, ``top_k``, ``straight_through``; see ``SoftRoute``),
            applied to the route it starts from (after ``route``/``route_init``).
        update_shared: Let ``parts`` name what every task shares (``templates``,
            ``trunk``, ``stem``, ``hypernet``): the existing tasks' outputs then
            change, and the accuracies recorded for them are from before.

    Raises:
        ConfigError: A bad option, or a shared part without ``update_shared``.
        RunDirError: No trained run, another writer, an unfinished other phase, an
            unfinished transfer of this task with other options, the task exists
            (without ``overwrite``), or it is a task the pool was trained with.
    """
    config = config or TrainConfig()
    if isinstance(grow, bool) or not isinstance(grow, int) or grow < 0:
        raise ConfigError(f"--grow must be an integer >= 0, got {grow!r}")
    wanted = parse_parts(parts)
    if route is not None and route not in ROUTE_KINDS:
        raise ConfigError(f"unknown --route {route!r}: leave it out or use one of {ROUTE_KINDS}")
    if route_init is not None and route_init not in ROUTE_INITS:
        raise ConfigError(
            f"unknown --route-init {route_init!r}: leave it out or use one of {ROUTE_INITS}"
        )
    shape = dict(route=route, route_init=route_init)
    run_dir = Path(run_dir)
    ctx = init_distributed(config.device)
    if not io.is_run_dir(run_dir):
        raise RunDirError(
            f"{run_dir} holds no trained run: run `modnet train --out {run_dir}` first"
        )
    with io.open_run(run_dir, "modnet transfer", enabled=ctx.is_main):
        barrier(ctx)
        return _transfer(
            run_dir, task, wanted, grow, config, init_from, overwrite, shape, ctx, route_options,
            update_shared,
        )  # fmt: skip


def _transfer(
    run_dir, task, wanted, grow, config, init_from, overwrite, shape, ctx, route_options,
    update_shared,
) -> TrainResult:  # fmt: skip
    latest, state = io.run_state(run_dir, repair=ctx.is_main)
    if latest is None:
        raise RunDirError(
            f"{run_dir} holds no trained run: run `modnet train --out {run_dir}` first"
        )
    if io.unfinished_phase(state) == "train":
        io.refuse_other_phase(run_dir, state, "transfer")
    model, manifest = io.load_model(latest)
    wanted = present_parts(wanted, model)
    if not wanted - {"norm"}:  # running statistics move only in passes that train something
        raise ConfigError(
            "--train norm alone trains no parameter: the norm statistics are re-estimated "
            "while something trains; add route or head (e.g. --train route,norm)"
        )
    check_shared(wanted, update_shared)
    if init_from not in (None, NEAREST, *model.task_names):
        raise ConfigError(
            f"--init-from {init_from!r} is not a task of the run: one of "
            f"{', '.join(model.task_names)} or {NEAREST}"
        )
    if route_options:  # a bad option fails here, before the data is read
        known = init_from in model.task_names
        source = model.routes[init_from] if known else model._default_route()
        try:
            configured_route(source, route_options)
        except ValueError as error:
            raise ConfigError(f"route_options: {error}") from None
    data = load_data([task], model, config)
    name = next(iter(data))
    phase = f"transfer-{name}"
    io.refuse_other_phase(run_dir, state, phase)
    if init_from is None or "norm" in wanted:
        wanted = wanted | {"norm"}
    if grow:
        wanted = wanted | {"new_templates"}
    plan = dict(parts=sorted(wanted), grow=grow, init_from=init_from, task_spec=task)
    plan.update({k: v for k, v in shape.items() if v is not None})  # older plans lack them
    if route_options:
        plan["route_options"] = dict(route_options)
    resuming = io.unfinished_phase(state) == phase
    if resuming:
        stored_plan = json.loads(state["transfer"])
        check_resume_options(run_dir, phase, json.loads(state["config"]), config, stored_plan, plan)
        plan = stored_plan
    elif (
        state is not None
        and state.get("phase") == phase
        and outputs_missing(run_dir, phase, latest)
        and not changed_training_options(json.loads(state.get("config", "{}")), config)
    ):
        stored_plan = json.loads(state["transfer"])
        return _complete_outputs(
            run_dir, phase, model, state, latest, ctx, frozenset(stored_plan["parts"]), [name],
            stored_plan, stored_plan["first_new_chunk"],
        )  # fmt: skip
    else:
        if name in model.task_names:
            recorded = manifest["tasks"][name].get("dataset")
            if not overwrite and recorded not in (None, portable_spec(task)):
                raise RunDirError(
                    f"{run_dir} already has a task {name!r}, from {recorded}, not {task}: a file "
                    "or folder task takes its file's or folder's name, so rename this one"
                )
            trained_in = io.task_phase(run_dir, manifest, name)
            if trained_in == "train":
                raise RunDirError(
                    f"{run_dir} already has a task {name!r}, one that `modnet train` trained "
                    "its pool with: transfer never replaces such a task (its route, head and "
                    "statistics would be lost for good); transfer a copy of its data saved "
                    "under another name, or train a new run"
                )
            if trained_in.startswith("adapt-"):
                raise RunDirError(
                    f"{run_dir} already has a task {name!r}, one that `modnet adapt` adapted "
                    "without labels: transfer does not replace it; adapt it again with "
                    f"`modnet adapt {run_dir} --target {task} --overwrite`, or transfer "
                    "into a copy of the run"
                )
            if not overwrite:  # the same dataset: retraining it is what --overwrite is for
                raise RunDirError(
                    f"{run_dir} already has a task {name!r}: pass --overwrite (overwrite=True) "
                    "to retrain it"
                )
            model = _without_task(latest, name)
        source = init_from
        if init_from == NEAREST:
            plan["source_distances"] = _source_distances(model, manifest, data[name], config)
            source = plan["nearest"] = min(
                plan["source_distances"], key=plan["source_distances"].__getitem__
            )
        classes = data[name].num_classes
        if "heads" not in wanted and (source is None or model.task_classes[source] != classes):
            where = f"{source!r} has {model.task_classes[source]}" if source else "no --init-from"
            warnings.warn(
                f"--train {shown(wanted)} leaves the "
                f"head of {name!r} ({classes} "
                f"classes) random and frozen ({where}): add head to --train, or --init-from "
                f"a task with {classes} classes",
                UserWarning,
                stacklevel=2,
            )
        torch.manual_seed(config.seed)  # the new head, route and templates follow --seed alone
        model.add_task(name, classes, init_from=source)
        if shape["route"] or shape["route_init"]:
            start = model.routes[name]
            tensors = model.pool.num_tensors
            model.set_route(name, _shaped_route(start, **shape, num_tensors=tensors))
        if route_options:
            model.set_route(name, configured_route(model.routes[name], route_options))
        if source and "heads" not in wanted:
            _copy_frozen_head(model, source=source, target=name)
        plan["first_new_chunk"] = None
        if grow:
            plan["first_new_chunk"] = len(model.pool.chunks)
            model.grow(grow, task=name)
    model.set_trainable(name, plan["parts"], plan["first_new_chunk"])
    if not any(p.requires_grad for p in model.parameters()):  # nothing written yet
        raise ConfigError(
            f"--train {shown(frozenset(plan['parts']))} trains no parameter of task {name!r} "
            "(a hard route holds template indices, not weights): add head to --train"
        )
    route = model.routes[name]
    if (
        not resuming
        and "routes" in plan["parts"]
        and not any(p.requires_grad for p in route.parameters())
    ):
        trained = shown(frozenset(plan["parts"]) - {"routes"})
        warnings.warn(
            f"the route of {name!r} is hard (a fixed block order, not weights), so --train "
            f"route trains nothing for it (trained: {trained}): a run made with "
            "--model-arg route=soft (or another weighted route) learns routes",
            UserWarning,
            stacklevel=2,
        )
    broadcast_state(model, ctx)
    info = io.recorded_task_info(manifest, [n for n in model.task_names if n != name])
    info[name] = _task_info(task, data[name], phase)
    trainer = Trainer(
        model,
        data,
        config,
        run_dir,
        phase,
        ctx,
        info,
        resume_state=state if resuming else None,
        extra_manifest={k: v for k, v in manifest.items() if k == "model_name"},
        extra_state={"transfer": plan},
    )
    accuracy = trainer.fit()
    result = TrainResult(
        model, accuracy, run_dir, io.latest_checkpoint(run_dir), len_trained(trainer)
    )
    if ctx.is_main:
        save_run_figures(model, run_dir)  # the routes now include the new task
        # The outdated marks go first: once the results are written the phase is complete.
        changed_shared(run_dir, phase, plan["parts"], [n for n in model.task_names if n != name])
        _record_results(run_dir, phase, result, model, extra=plan)
    return result


def nearest_source(
    run_dir: str | Path, task: str, config: TrainConfig | None = None
) -> tuple[str, dict[str, float]]:
    """The task of a run that ``transfer(..., init_from="nearest")`` would start ``task`` from.

    Reads the run only. Lets a caller that transfers the same task many times
    (several methods on copies of one pool) choose once and pass the name.

    Args:
        run_dir: A trained run (or model directory).
        task: Dataset spec of the new task.
        config: Options the transfer will run with (data root, limits, seed).

    Returns:
        The nearest task's name and every source task's distance (lower: closer).

    Raises:
        ConfigError: The run records no task's dataset.
    """
    config = config or TrainConfig()
    model, manifest = io.load_model(run_dir)
    target = next(iter(load_data([task], model, config).values()))
    distances = _source_distances(model, manifest, target, config, exclude=target.name)
    return min(distances, key=distances.__getitem__), distances


def _source_distances(
    model: ModularNet,
    manifest: Mapping[str, Any],
    target: TaskData,
    config: TrainConfig,
    exclude: str | None = None,
) -> dict[str, float]:
    """``source_distances`` of every task of the run that records its dataset."""
    from ..adapt.selection import source_distances

    names = [n for n in model.task_names if n != exclude]
    specs = {n: manifest["tasks"].get(n, {}).get("dataset") for n in names}
    specs = {n: spec for n, spec in specs.items() if spec}
    if not specs:
        raise ConfigError(
            f"--init-from {NEAREST} needs the source tasks' images, but the run records no "
            "dataset for any task: name the source task instead"
        )
    small = dataclasses.replace(config, train_limit=NEAREST_SAMPLE, augment=False)
    sources = {}
    for name, spec in specs.items():
        try:
            (sources[name],) = load_data([spec], model, small).values()
        except DataError as error:
            raise DataError(
                f"--init-from {NEAREST} compares the new task with every task's images, and "
                f"the images of task {name!r} cannot be read: {error}; name the source "
                "instead (--init-from TASK)"
            ) from None
    unlabelled = dataclasses.replace(target, train_y=torch.zeros_like(target.train_y))
    return source_distances(model, sources, unlabelled, sample=NEAREST_SAMPLE, seed=config.seed)


def _shaped_route(start, route: str | None, route_init: str | None, num_tensors: int) -> SoftRoute:
    """``start`` (a soft route) made uniform and/or anisotropic, per ``transfer``'s options."""
    if not isinstance(start, SoftRoute):
        raise ConfigError(
            f"--route/--route-init need soft routes, but the run's routes are "
            f"{type(start).__name__}s: leave those options out"
        )
    new = copy.deepcopy(start)  # keeps the run's normalisation and whatever else it holds
    logits = start.logits.detach()
    if route_init == "uniform":
        uniform = SoftRoute(start.depth, start.num_templates, 1, start.normalize, init="uniform")
        logits = uniform.logits.detach().to(logits)
        if start.anisotropic:
            logits = logits.unsqueeze(-1).expand(start.logits.shape)
    if route == "anisotropic" and logits.ndim == 2:
        logits = logits.unsqueeze(-1).expand(*logits.shape, num_tensors)
        new.anisotropic = True
    new.logits = torch.nn.Parameter(logits.clone())
    return new


def _copy_frozen_head(model: ModularNet, source: str, target: str) -> None:
    """A head that will not train is useless at random: take the source's if labels match."""
    if model.task_classes[source] == model.task_classes[target]:
        model.heads[target].load_state_dict(model.heads[source].state_dict())


def _without_task(checkpoint: Path, name: str) -> ModularNet:
    """The run's model without task ``name``, nor the templates grown for it that no
    other task's route reaches: retraining a task starts from the pool its first
    transfer saw, however often it is retrained."""
    manifest = io.read_manifest(checkpoint)
    keep = [n for n in manifest["tasks"] if n != name]
    model, _ = io.load_model(checkpoint, tasks=keep)
    widest = max((route.num_templates for route in model.routes.values()), default=0)
    chunks = model.pool.chunks
    while len(chunks) > 1 and model.pool.num_templates - chunks[-1].num_templates >= widest:
        del chunks[-1]
    return model


def len_trained(trainer: Trainer) -> int:
    return sum(p.numel() for p in trainer.params)


def _record_results(
    run_dir: Path, phase: str, result: TrainResult, model: ModularNet, extra=None
) -> None:
    io.record_results(
        run_dir,
        phase,
        dict(
            accuracy=result.accuracy,
            chance={name: 1.0 / model.task_classes[name] for name in result.accuracy},
            trained_parameters=result.trained_parameters,
            checkpoint=result.checkpoint.name if result.checkpoint else None,
            **(extra or {}),
        ),
    )
