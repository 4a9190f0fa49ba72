"""Checkpoints: one safetensors file for the shared pool, one small file per task.

A *model directory* holds::

    manifest.json          model config, pool structure, every task's route structure,
                           classes, dataset spec and data transform
    pool.safetensors       everything shared: templates, trunk, hypernetwork
    tasks/<task>.safetensors   one task's route, head and norm statistics

A *run directory* holds checkpoints of such model directories under
``checkpoints/<name>/`` (plus ``trainer_state.pt`` for resuming) and a ``LATEST``
file naming the newest complete one. Every write goes to a temporary name first
and is renamed into place, so a crash or kill never leaves a half-written
checkpoint where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .factory import build_model
from .model import ModularNet
from .routing import route_from_spec

FORMAT = "modnet-model/1"
MANIFEST = "manifest.json"
SHARED_FILE = "pool.safetensors"
TASK_DIR = "tasks"
TRAINER_STATE = "trainer_state.pt"
LATEST = "LATEST"
CHECKPOINTS = "checkpoints"
TASK_PREFIXES = ("routes.", "heads.", "norm_stats.")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, or does not match what it is loaded into."""


# --------------------------------------------------------------------------- atomic writes
def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through ``write(tmp_path)`` and renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------- structure
def describe(model: ModularNet) -> dict[str, Any]:
    """The model's structure, without values: what ``build`` needs to recreate it."""
    return {
        "config": dict(model.config),
        "pool_chunks": [chunk.num_templates for chunk in model.pool.chunks],
        "tasks": {
            name: {"num_classes": model.task_classes[name], "route": model.routes[name].spec()}
            for name in model.task_names
        },
    }


def build(structure: Mapping[str, Any], tasks: Iterable[str] | None = None) -> ModularNet:
    """An uninitialised model with the described structure (and only ``tasks``, if given)."""
    model = build_model(structure["config"])
    first, *grown = structure["pool_chunks"]
    if first != model.pool.num_templates:
        raise CheckpointError(
            f"the manifest's first template chunk has {first} templates but the config "
            f"builds {model.pool.num_templates}: the manifest is inconsistent"
        )
    for count in grown:
        model.pool.grow(count, init=0)
    known = structure["tasks"]
    for name in known if tasks is None else tasks:
        if name not in known:
            raise CheckpointError(f"the checkpoint has no task {name!r}; it has {sorted(known)}")
        entry = known[name]
        model.add_task(name, entry["num_classes"], route=route_from_spec(entry["route"]))
    return model


def _is_task_key(key: str, task: str) -> bool:
    return any(key.startswith(f"{prefix}{task}.") for prefix in TASK_PREFIXES)


def _is_shared_key(key: str) -> bool:
    return not key.startswith(TASK_PREFIXES)


# ------------------------------------------------------------------------ model dirs
def save_model(
    model: ModularNet,
    directory: str | Path,
    task_info: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Saves ``model`` as a model directory, atomically as a whole.

    Args:
        model: The model to save.
        directory: Target directory; replaced if it exists.
        task_info: Per task, JSON-able facts to keep with it (dataset spec, transform).
        extra: Further JSON-able entries for the manifest.
    """
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / TASK_DIR).mkdir(parents=True)
    _record_normalization(model, task_info or {})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in state.items() if _is_shared_key(k)}, tmp / SHARED_FILE)
    manifest = {"format": FORMAT, **describe(model), **dict(extra or {})}
    manifest["pretrained_cfg"] = json.loads(json.dumps(model.pretrained_cfg, default=str))
    for name in model.task_names:
        tensors = {k: v for k, v in state.items() if _is_task_key(k, name)}
        save_file(tensors, tmp / TASK_DIR / f"{name}.safetensors")
        entry = manifest["tasks"][name]
        entry["file"] = f"{TASK_DIR}/{name}.safetensors"
        entry.update((task_info or {}).get(name, {}))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _replace_dir(tmp, directory)
    return directory


def _replace_dir(tmp: Path, directory: Path) -> None:
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, directory)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"no {MANIFEST} in {directory}: not a modnet model or run directory "
            "(train one with `modnet train --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is corrupted (invalid JSON: {error})") from error
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint file {path} is corrupted: {error}") from error


def load_model(
    directory: str | Path, tasks: Iterable[str] | None = None
) -> tuple[ModularNet, dict[str, Any]]:
    """Loads a model directory (or a run's latest checkpoint), optionally only some tasks.

    Returns the model (in eval mode) and its manifest.
    """
    directory = resolve_model_dir(directory)
    manifest = read_manifest(directory)
    selected = list(manifest["tasks"]) if tasks is None else list(tasks)
    model = build(manifest, selected)
    state = _load_tensors(directory / SHARED_FILE)
    for name in selected:
        state.update(_load_tensors(directory / manifest["tasks"][name]["file"]))
    load_state_into(model, state, source=str(directory))
    _record_normalization(model, manifest["tasks"])
    return model.eval(), manifest


def _record_normalization(model: ModularNet, info: Mapping[str, Mapping[str, Any]]) -> None:
    """Gives the model each task's input mean/std from its transform record, if any."""
    for name in model.task_names:
        transform = (info.get(name) or {}).get("transform") or {}
        if transform.get("mean") is not None and transform.get("std") is not None:
            model.set_normalization(name, transform["mean"], transform["std"])


def load_state_into(model: ModularNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names the checkpoint and the mismatch when it fails."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"checkpoint {source} does not match the model: {error}") from error


# -------------------------------------------------------------------------- run dirs
def resolve_model_dir(path: str | Path) -> Path:
    """A model directory itself, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} holds no modnet checkpoint (no {MANIFEST} and no {LATEST}): "
            "train one with `modnet train --out DIR`"
        )
    return latest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    target = Path(run_dir) / CHECKPOINTS / pointer.read_text().strip()
    if not (target / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {target}, which is not a complete checkpoint")
    return target


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    model: ModularNet,
    trainer_state: Mapping[str, Any] | None = None,
    task_info: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Writes ``checkpoints/<name>`` completely, then points ``LATEST`` at it.

    Older checkpoints beyond the newest ``keep`` are removed afterwards.
    """
    run_dir = Path(run_dir)
    target = run_dir / CHECKPOINTS / name
    save_model(model, target, task_info, extra)
    if trainer_state is not None:
        atomic_write(target / TRAINER_STATE, lambda tmp: torch.save(dict(trainer_state), tmp))
    atomic_write_text(run_dir / LATEST, name + "\n")
    _prune(run_dir / CHECKPOINTS, keep=keep, protect=name)
    return target


def _prune(directory: Path, keep: int, protect: str) -> None:
    complete = sorted(
        (p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    for old in complete[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # torch raises several types for damaged pickles
        raise CheckpointError(f"trainer state {path} is corrupted: {error}") from error
