"""``train`` and ``transfer``: the project's main job, callable from Python or the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from .. import io
from ..data import SYNTHETIC_DEFAULT_TASKS, TaskData, load_task
from ..model import ModularNet
from ..plot import save_run_figures
from .config import TrainConfig
from .distributed import broadcast_state, init_distributed
from .loop import Trainer
from .parts import ALL_PARTS, configure_trainable, parse_parts

RESULTS_FILE = "results.json"


class RunDirError(ValueError):
    """A run directory cannot be used for what was asked."""


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
    data: dict[str, TaskData] = {}
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
        )
        if task.name in data:
            raise ValueError(f"task {task.name!r} is listed twice: each task needs its own name")
        data[task.name] = task
    return data


def _task_info(spec: str, task: TaskData) -> dict[str, Any]:
    return {"dataset": spec, "transform": task.transform}


def _check_run_dir(run_dir: Path, phase: str, overwrite: bool):
    """Returns (latest checkpoint, trainer state) when ``phase`` should resume there."""
    latest = io.latest_checkpoint(run_dir) if run_dir.exists() else None
    if latest is None:
        return None, None
    state = io.load_trainer_state(latest)
    if overwrite:
        return None, None
    if state is not None and state["phase"] == phase and not state["done"]:
        return latest, state
    return latest, None


def train(
    config: TrainConfig | None = None, run_dir: str | Path = "runs/train", overwrite: bool = False
) -> TrainResult:
    """Trains a template pool with one route and head per task.

    An interrupted run in ``run_dir`` resumes from its last checkpoint with the
    options it was started with.

    Args:
        config: Options; the default trains ``modnet_conv_tiny`` on the built-in
            synthetic suite.
        run_dir: Output directory (checkpoints, metrics.jsonl, results.json, routes).
        overwrite: Start afresh even if ``run_dir`` holds a run.
    """
    config = config or TrainConfig()
    run_dir = Path(run_dir)
    ctx = init_distributed(config.device)
    latest, state = _check_run_dir(run_dir, "train", overwrite)
    if latest is not None and state is None:
        raise RunDirError(
            f"{run_dir} already holds a finished run: choose another --out, or pass --overwrite "
            "to replace it"
        )
    if overwrite and run_dir.exists() and ctx.is_main:
        shutil.rmtree(run_dir)
    if state is not None:
        config = TrainConfig.from_dict(json.loads(state["config"]))
        model, manifest = io.load_model(latest)
        specs = [manifest["tasks"][n]["dataset"] for n in model.task_names]
    else:
        torch.manual_seed(config.seed)
        model = timm.create_model(config.model, **config.model_kwargs)
        specs = list(config.tasks or SYNTHETIC_DEFAULT_TASKS)
    data = load_data(specs, model, config)
    if state is None:
        for name, task in data.items():
            model.add_task(name, task.num_classes)
    configure_trainable(model, ALL_PARTS, list(data))
    broadcast_state(model, ctx)
    trainer = Trainer(
        model,
        data,
        config,
        run_dir,
        "train",
        ctx,
        {name: _task_info(spec, data[name]) for spec, name in zip(specs, data, strict=True)},
        resume_state=state,
        extra_manifest={"model_name": config.model},
    )
    accuracy = trainer.fit()
    result = TrainResult(
        model, accuracy, run_dir, io.latest_checkpoint(run_dir), len_trained(trainer), ctx.is_main
    )
    if ctx.is_main:
        _record_results(run_dir, "train", result, data)
        save_run_figures(model, run_dir)
    return result


def transfer(
    run_dir: str | Path,
    task: str,
    parts: str = "route,head",
    grow: int = 0,
    config: TrainConfig | None = None,
    init_from: str | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Learns a new task on a trained pool; every existing task stays bit-identical.

    Args:
        run_dir: A run directory from ``train``; the new task is saved into it.
        task: Dataset spec of the new task (e.g. ``cifar10``, ``synth_size``).
        parts: What trains, e.g. ``"route,head"`` (the default: the pool is frozen),
            ``"route,head,templates"`` or ``"all"``. The new task's norm statistics
            always learn, as they start empty, unless ``init_from`` supplies them
            and ``norm`` is not listed. Without ``head``, the head is copied from
            ``init_from`` when both have the same number of classes.
        grow: Add this many templates that only the new task uses (and trains).
        config: Training options (epochs, lr, data root, ...).
        init_from: Start the route and norm statistics from this existing task.
        overwrite: Replace the task if the run already has it.
    """
    config = config or TrainConfig()
    run_dir = Path(run_dir)
    ctx = init_distributed(config.device)
    latest = io.latest_checkpoint(run_dir) if run_dir.exists() else None
    if latest is None:
        raise RunDirError(
            f"{run_dir} holds no trained run: run `modnet train --out {run_dir}` first"
        )
    model, manifest = io.load_model(latest)
    state = io.load_trainer_state(latest)
    data = load_data([task], model, config)
    name = next(iter(data))
    phase = f"transfer-{name}"
    resume = state if state and state["phase"] == phase and not state["done"] else None
    if resume is not None:
        plan = json.loads(resume["transfer"])
        config = TrainConfig.from_dict(json.loads(resume["config"]))
    else:
        if name in model.task_names:
            if not overwrite:
                raise RunDirError(
                    f"{run_dir} already has a task {name!r}: pass --overwrite to retrain it"
                )
            model = _without_task(latest, name)
        wanted = parse_parts(parts)
        if init_from is None or "norm" in wanted:
            wanted = wanted | {"norm"}
        first_new = None
        model.add_task(name, data[name].num_classes, init_from=init_from)
        if init_from and "heads" not in wanted:
            _copy_frozen_head(model, source=init_from, target=name)
        if grow:
            first_new = len(model.pool.chunks)
            model.grow(grow, task=name)
            wanted = wanted | {"new_templates"}
        plan = dict(parts=sorted(wanted), first_new_chunk=first_new, grow=grow)
    configure_trainable(model, frozenset(plan["parts"]), [name], plan["first_new_chunk"])
    broadcast_state(model, ctx)
    info = {
        n: {
            k: manifest["tasks"][n][k]
            for k in ("dataset", "transform")
            if k in manifest["tasks"][n]
        }
        for n in model.task_names
        if n != name
    }
    info[name] = _task_info(task, data[name])
    trainer = Trainer(
        model,
        data,
        config,
        run_dir,
        phase,
        ctx,
        info,
        resume_state=resume,
        extra_manifest={k: v for k, v in manifest.items() if k == "model_name"},
        extra_state={"transfer": plan},
    )
    accuracy = trainer.fit()
    result = TrainResult(
        model, accuracy, run_dir, io.latest_checkpoint(run_dir), len_trained(trainer)
    )
    if ctx.is_main:
        _record_results(run_dir, phase, result, data, extra=plan)
    return result


def _copy_frozen_head(model: ModularNet, source: str, target: str) -> None:
    """A head that will not train is useless at random: take the source's if labels match."""
    if model.task_classes[source] == model.task_classes[target]:
        model.heads[target].load_state_dict(model.heads[source].state_dict())


def _without_task(checkpoint: Path, name: str) -> ModularNet:
    manifest = io.read_manifest(checkpoint)
    keep = [n for n in manifest["tasks"] if n != name]
    model, _ = io.load_model(checkpoint, tasks=keep)
    return model


def len_trained(trainer: Trainer) -> int:
    return sum(p.numel() for p in trainer.params)


def _record_results(
    run_dir: Path, phase: str, result: TrainResult, data: dict[str, TaskData], extra=None
) -> None:
    path = run_dir / RESULTS_FILE
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[phase] = dict(
        accuracy=result.accuracy,
        chance={name: 1.0 / task.num_classes for name, task in data.items()},
        trained_parameters=result.trained_parameters,
        checkpoint=result.checkpoint.name if result.checkpoint else None,
        **(extra or {}),
    )
    io.atomic_write_text(path, json.dumps(results, indent=2) + "\n")
