"""Checkpoints: one safetensors file for the shared pool, one small file per task.

A *model directory* holds::

    manifest.json              model config, pool structure and fingerprint, every task's
                               route structure, classes, dataset spec and data transform
    pool.safetensors           everything shared: templates, trunk, hypernetwork
    tasks/<task>.safetensors   one task's route, head and norm statistics; its metadata
                               names the task, its classes, route and pool fingerprint

The whole directory is written under a temporary name, every file and folder in
it is fsynced, and it is then renamed into place, so a crash never leaves a
half-written model directory where a complete one is expected.

A task file can be imported into another model whose pool has the same
*fingerprint* (a SHA-256 of the pool's structure and values, see
``pool_fingerprint``): ``import_task``. A task file does not work with another
pool, so a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from ..errors import CheckpointError
from ..factory import build_model, unbuildable_reason
from ..families.base import PREPROCESSING_KEYS
from ..model import ModularNet
from ..routing import route_from_spec
from .fs import (
    LEFTOVER,
    LEGACY_LEFTOVER,
    OLD_MARK,
    TMP_MARK,
    disk_full_names,
    existing_ancestor,
    follow_umask,
    fsync_path,
    fsync_tree,
)

FORMAT = "modnet-model/1"
MANIFEST = "manifest.json"
SHARED_FILE = "pool.safetensors"
TASK_DIR = "tasks"
# A checkpoint's trainer state, written into its model directory (see ``io.run``).
TRAINER_STATE = "trainer_state.pt"
MODEL_FILES = (MANIFEST, SHARED_FILE, TRAINER_STATE)
TASK_PREFIXES = ("routes.", "heads.", "norm_stats.")
# What modnet's commands write into a model folder, which ``save_model`` keeps when it
# replaces the folder: ``modnet routes`` / ``modnet plot`` figures (``routes.png``,
# ``routes.txt``, ``routes-<task>.png`` / ``.txt`` with ``--task``, ``curves.png``
# with ``plot --out``) and ``modnet export``'s folder ``export/`` (``<task>.pt2``,
# ``<task>/model.safetensors`` and ``config.json``, see ``io.run.OUTPUT_FOLDERS``).
COMMAND_FIGURE = re.compile(r"^(routes|routes-.+)\.(png|txt)$|^curves\.png$")
EXPORT_DIR = "export"

__all__ = [
    "FORMAT",
    "MANIFEST",
    "SHARED_FILE",
    "TASK_DIR",
    "TASK_PREFIXES",
    "CheckpointError",
    "build",
    "describe",
    "import_task",
    "load_model",
    "load_state_into",
    "pool_fingerprint",
    "read_manifest",
    "recorded_task_info",
    "save_model",
]


# ------------------------------------------------------------------------- structure
def describe(model: ModularNet) -> dict[str, Any]:
    """The model's structure, without values: what ``build`` needs to recreate it."""
    tasks = {}
    for name in model.task_names:
        tasks[name] = {"num_classes": model.task_classes[name], "route": model.routes[name].spec()}
        if name in model.task_normalization:  # set_normalization's values, without a transform
            tasks[name]["normalization"] = {
                k: list(v) for k, v in model.task_normalization[name].items()
            }
    return {
        "config": dict(model.config),
        "pool_chunks": [chunk.num_templates for chunk in model.pool.chunks],
        "tasks": tasks,
    }


def recorded_task_info(
    manifest: Mapping[str, Any], names: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """What ``manifest`` records about each of ``names`` beyond its structure (dataset,
    transform, the phase that trained it, how it was adapted): the ``task_info`` a
    later checkpoint of the run carries over, whole, for the tasks it did not train."""
    structure = {"num_classes", "route", "file", "normalization"}
    return {
        name: {k: v for k, v in manifest["tasks"].get(name, {}).items() if k not in structure}
        for name in names
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
    recorded = structure.get("pretrained_cfg")
    if recorded:
        # timm's registry fields (architecture, license, ...) come back as saved, in
        # their order; what the model derives (sizes, normalisation, names) is its own.
        # How images are resized and cropped is as saved: the model was evaluated so
        # (a manifest written before a converted model kept its source's has bilinear
        # and 1.0 there, the defaults it was saved with).
        fresh = model.pretrained_cfg
        cfg = {k: fresh.get(k, tuple(v) if isinstance(v, list) else v) for k, v in recorded.items()}
        cfg = {**cfg, **fresh}
        cfg.update((k, recorded[k]) for k in PREPROCESSING_KEYS if recorded.get(k) is not None)
        model.pretrained_cfg = cfg
    return model


def _is_task_key(key: str, task: str) -> bool:
    return any(key.startswith(f"{prefix}{task}.") for prefix in TASK_PREFIXES)


def _is_shared_key(key: str) -> bool:
    return not key.startswith(TASK_PREFIXES)


def _shared_state(model: ModularNet) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if _is_shared_key(k)
    }


def pool_fingerprint(model_or_state: ModularNet | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of everything tasks share: the config, template chunks and shared values.

    Two models have the same fingerprint exactly when a task file of one computes
    the same function in the other. Accepts a model or the shared state dict as
    written to ``pool.safetensors`` (then without the structure, which the values'
    names and shapes already fix).
    """
    if isinstance(model_or_state, ModularNet):
        state = _shared_state(model_or_state)
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in model_or_state.items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(f"{key}|{value.dtype}|{list(value.shape)}\n".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


# ------------------------------------------------------------------------ model dirs
def save_model(
    model: ModularNet,
    directory: str | Path,
    task_info: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Saves ``model`` as a model directory, atomically and durably as a whole.

    Every file and folder is fsynced before the rename that publishes the
    directory, and the parent folder after it.

    Args:
        model: The model to save.
        directory: Target directory: new, empty, or a model directory modnet wrote,
            which is replaced. What modnet's commands wrote into that model folder
            (``modnet routes`` / ``plot`` figures: ``routes.png``, ``routes.txt``,
            ``routes-<task>.png`` / ``.txt``, ``curves.png``; ``modnet export``'s
            ``export/<task>.pt2`` and ``export/<task>/``) is kept as it is, never
            deleted: it still shows the model saved before, so draw or export it
            again (``modnet routes DIR --overwrite``, ``modnet export DIR --task T``).
            A folder holding anything else is refused, so that nothing modnet did
            not write is ever deleted.
        task_info: Per task, JSON-able facts to keep with it (dataset spec, transform,
            the phase that trained it).
        extra: Further JSON-able entries for the manifest.

    Raises:
        CheckpointError: ``directory`` is a file, or a folder holding files modnet
            did not write (the message names one).
        DiskFullError: The device is full (the message names the directory).

    Warns:
        UserWarning: The model was converted by ``from_timm`` from a timm model that
            ``load_model`` cannot recreate (one line, saying how to convert it so
            that it can); the folder is saved all the same.
    """
    directory = Path(directory)
    _check_replaceable(directory)
    keep = _command_outputs(directory) if directory.is_dir() else []
    _save_model_dir(model, directory, task_info, extra, keep=[p.name for p in keep])
    _warn_unloadable(model, directory)
    return directory


def task_file_name(name: str, entry: Mapping[str, Any] | None = None) -> str:
    """Where a manifest's task entry keeps the task's tensors, relative to the model
    folder: its ``file``, or ``tasks/<name>.safetensors`` (what ``save_model`` writes)."""
    return (entry or {}).get("file", f"{TASK_DIR}/{name}.safetensors")


def _warn_unloadable(model: ModularNet, directory: Path) -> None:
    """Warns that ``load_model`` will refuse ``directory`` (see ``unbuildable_reason``)."""
    reason = unbuildable_reason(model.config)
    if reason:
        warnings.warn(
            f"{directory} is saved, but modnet.io.load_model cannot rebuild it: {reason}",
            stacklevel=3,
        )


def _save_model_dir(
    model: ModularNet,
    directory: Path,
    task_info: Mapping[str, Mapping[str, Any]] | None,
    extra: Mapping[str, Any] | None,
    files: Mapping[str, Callable[[Path], None]] | None = None,
    keep: Iterable[str] = (),
) -> Path:
    """``save_model`` without its checks: also replaces a run's checkpoint (``io.run``).

    Args:
        model: The model to save.
        directory: The model directory, written under a temporary name and renamed
            into place only once complete.
        task_info: Per task, what its manifest entry records beyond the model's.
        extra: Further manifest fields.
        files: Further files of the folder, by name: ``files[name](path)`` writes
            one (a checkpoint's trainer state) before the folder is flushed and
            renamed into place, so the folder never appears without it.
        keep: Entries of the folder being replaced that move into the new one
            (``save_model``'s command outputs, see ``_command_outputs``).
    """
    tmp = directory.with_name(f".{directory.name}{TMP_MARK}{os.getpid()}")
    with disk_full_names(directory):
        try:
            _write_model_dir(tmp, model, task_info, extra, files or {})
            _replace_dir(tmp, directory, keep)
        finally:
            if tmp.exists():  # a failed write leaves nothing behind
                shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _check_replaceable(directory: Path) -> None:
    """Refuses a target ``save_model`` must not replace (see its docstring)."""
    from .run import is_run_dir, run_root

    ancestor = existing_ancestor(directory)
    if ancestor != directory and not ancestor.is_dir():
        raise CheckpointError(
            f"{directory} cannot be created: {ancestor} is a file, not a folder: choose a path "
            f"that is not inside {ancestor}"
        )
    here = Path.cwd().resolve()
    if directory.resolve() in (here, *here.parents):
        raise CheckpointError(
            f"{directory} is the current folder (or holds it): save_model replaces its folder "
            "as a whole, so give it a folder of its own, such as model/"
        )
    if directory.is_dir() and is_run_dir(directory):
        raise CheckpointError(
            f"{directory} is a modnet run directory: save the model to a new or empty folder "
            "(a run's checkpoints are written by its training)"
        )
    run = run_root(directory)
    if run != directory and is_run_dir(run):
        raise CheckpointError(
            f"{directory} is a checkpoint of the run {run}: save the model "
            "to a new or empty folder (a run's checkpoints are written by its training)"
        )
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"{directory} is a file, not a model directory: save the model to a new or empty folder"
        )
    foreign = _foreign_entries(directory, outputs=True) if directory.is_dir() else []
    if foreign:
        raise CheckpointError(
            f"{directory} holds {foreign[0].relative_to(directory)}, which is not part of a "
            "saved model (saving replaces the whole folder): save the model to a new or empty "
            "folder, or move that out first"
        )


def _foreign_entries(directory: Path, outputs: bool = False) -> list[Path]:
    """What in ``directory`` is not part of a model directory modnet wrote: everything,
    unless it holds a modnet manifest; then anything but the model's files (the task
    files its manifest names), a checkpoint's trainer state and the leftovers of a
    killed write, and with ``outputs`` what modnet's commands write into a model
    folder (``_command_outputs``); in an ``export/`` folder holding anything else,
    that (``export/notes.txt``)."""
    entries = sorted(directory.iterdir())
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        owned = manifest.get("format") == FORMAT
        tasks = manifest.get("tasks")
        task_files = {
            task_file_name(name, entry) for name, entry in tasks.items() if isinstance(entry, dict)
        }
    except (OSError, ValueError, AttributeError, TypeError):
        owned = False
    if not owned:
        return entries
    foreign = []
    kept = _command_outputs(directory) if outputs else []
    for entry in entries:
        if entry in kept:
            continue
        if outputs and entry.name == EXPORT_DIR and _is_plain_dir(entry):
            foreign += _foreign_exports(entry)
            continue
        if entry.name == TASK_DIR and entry.is_dir():
            files = sorted(entry.iterdir())
            foreign += [
                f for f in files if not (f.is_file() and f"{TASK_DIR}/{f.name}" in task_files)
            ]
        elif entry.name not in MODEL_FILES and not (
            LEFTOVER.match(entry.name) or LEGACY_LEFTOVER.match(entry.name)
        ):
            foreign.append(entry)
    return foreign


def _is_plain_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _foreign_exports(folder: Path) -> list[Path]:
    """What in a model folder's ``export/`` ``modnet export`` did not write: anything
    but ``<task>.pt2`` (a zip archive, as ``torch.export.save`` writes) and
    ``<task>/`` folders of ``model.safetensors`` and a ``config.json`` of modnet's
    export format (a folder left empty counts as modnet's); links are never its."""
    from ..export import SAFE_CONFIG, SAFE_FORMAT, SAFE_WEIGHTS

    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            foreign.append(entry)
        elif entry.is_file():
            if entry.suffix != ".pt2" or not _starts_with(entry, b"PK\x03\x04"):
                foreign.append(entry)
        elif entry.is_dir():
            for file in sorted(entry.iterdir()):
                if file.is_symlink() or not file.is_file():
                    foreign.append(file)
                elif file.name == SAFE_CONFIG:
                    try:
                        mine = json.loads(file.read_text()).get("format") == SAFE_FORMAT
                    except (OSError, ValueError, AttributeError):
                        mine = False
                    if not mine:
                        foreign.append(file)
                elif file.name != SAFE_WEIGHTS:
                    foreign.append(file)
        else:
            foreign.append(entry)
    return foreign


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(magic)) == magic
    except OSError:
        return False


def _command_outputs(directory: Path) -> list[Path]:
    """What modnet's commands wrote into the model folder ``directory``, which
    ``save_model`` keeps: its figures (``COMMAND_FIGURE``, plain files) and an
    ``export/`` folder holding only ``modnet export``'s files (``_foreign_exports``);
    nothing when ``directory`` holds no modnet manifest."""
    try:
        owned = json.loads((directory / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        owned = False
    if not owned:
        return []
    kept = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink():
            continue
        if entry.is_file() and COMMAND_FIGURE.match(entry.name):
            kept.append(entry)
        elif entry.name == EXPORT_DIR and entry.is_dir() and not _foreign_exports(entry):
            kept.append(entry)
    return kept


def _write_model_dir(
    tmp: Path,
    model: ModularNet,
    task_info: Mapping[str, Mapping[str, Any]] | None,
    extra: Mapping[str, Any] | None,
    files: Mapping[str, Callable[[Path], None]],
) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / TASK_DIR).mkdir(parents=True)
    _record_normalization(model, task_info or {})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    shared = {k: v for k, v in state.items() if _is_shared_key(k)}
    fingerprint = pool_fingerprint(shared)
    save_file(shared, tmp / SHARED_FILE, metadata={"pool_fingerprint": fingerprint})
    follow_umask(tmp / SHARED_FILE)
    manifest = {"format": FORMAT, **describe(model), "pool_fingerprint": fingerprint}
    manifest.update(dict(extra or {}))
    manifest["pretrained_cfg"] = json.loads(json.dumps(model.pretrained_cfg, default=str))
    for name in model.task_names:
        tensors = {k: v for k, v in state.items() if _is_task_key(k, name)}
        entry = manifest["tasks"][name]
        metadata = {
            "task": name,
            "num_classes": str(entry["num_classes"]),
            "route": json.dumps(entry["route"]),
            "pool_fingerprint": fingerprint,
        }
        entry["file"] = task_file_name(name)
        (tmp / entry["file"]).write_bytes(_task_file(tensors, metadata))
        follow_umask(tmp / entry["file"])
        entry.update((task_info or {}).get(name, {}))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for name, write in files.items():
        write(tmp / name)
        follow_umask(tmp / name)
    fsync_tree(tmp)


def _task_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A task's safetensors file, the same bytes whenever its tensors and metadata are.

    ``safetensors`` writes the metadata in hash-map order, which changes from one
    call to the next; the header (8-byte length, then JSON) is rewritten here with
    the metadata keys sorted. The rewrite has the same length, so the tensors'
    offsets hold; where it would not, the file is kept as written.
    """
    data = save(dict(tensors), metadata=dict(metadata))
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:
        return data
    return data[:8] + text.ljust(length) + data[8 + length :]


def _replace_dir(tmp: Path, directory: Path, keep: Iterable[str] = ()) -> None:
    """Renames ``tmp`` into place of ``directory``; the entries named in ``keep`` move
    from the replaced folder into the new one before the replaced one is removed (a
    kill in between leaves them in the hidden ``.<name>.modnet-old-<pid>`` folder)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        old = directory.with_name(f".{directory.name}{OLD_MARK}{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        keep = list(keep)
        for name in keep:
            os.replace(old / name, directory / name)
        if keep:
            fsync_path(directory)
        fsync_path(directory.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
        fsync_path(directory.parent)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of a model directory, checked field by field.

    Raises:
        CheckpointError: No manifest, invalid JSON, another format, or a field of
            the wrong type (the message names the file and the field).
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"no {MANIFEST} in {directory}: not a modnet model or run directory "
            "(train one with `modnet train --out DIR`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is corrupted (invalid JSON: {error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"{path} has format {found!r}, expected {FORMAT!r}")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: Mapping[str, Any], path: Path) -> None:
    def fail(field: str, expected: str, value: Any) -> None:
        raise CheckpointError(
            f"{path} is damaged: {field} should be {expected}, got {value!r}; restore the "
            "checkpoint or write it again"
        )

    config = manifest.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("depth"), int):
        fail("'config'", "an object with an integer 'depth'", config)
    chunks = manifest.get("pool_chunks")
    if (
        not isinstance(chunks, list)
        or not chunks
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in chunks)
    ):
        fail("'pool_chunks'", "a non-empty list of positive integers", chunks)
    tasks = manifest.get("tasks")
    if not isinstance(tasks, dict):
        fail("'tasks'", "an object", tasks)
    for name, entry in tasks.items():
        if not isinstance(entry, dict):
            fail(f"tasks[{name!r}]", "an object", entry)
        classes = entry.get("num_classes")
        if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
            # 0: a headless task (timm's num_classes=0), which gives pooled features
            fail(f"tasks[{name!r}]['num_classes']", "a non-negative integer", classes)
        route = entry.get("route")
        if not isinstance(route, dict) or not isinstance(route.get("kind"), str):
            fail(f"tasks[{name!r}]['route']", "an object with a 'kind'", route)
        if "file" in entry and not isinstance(entry["file"], str):
            fail(f"tasks[{name!r}]['file']", "a path string", entry["file"])
    fingerprint = manifest.get("pool_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        fail("'pool_fingerprint'", "a string", fingerprint)


def _read_file(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; ``what`` names it in errors ("task file")."""
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is missing")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{what} {path} is corrupted: {error}") from error
    return tensors, metadata


def _check_dtype(path: Path, tensors: Mapping[str, torch.Tensor], model: ModularNet) -> None:
    """Refuses a task file whose floating tensors are in another dtype than ``model``'s:
    its pool fingerprint differs for that reason alone, and "another pool" would mislead."""
    saved = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
    ours = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if saved is not None and ours is not None and saved != ours:
        raise CheckpointError(
            f"task file {path} holds {str(saved).removeprefix('torch.')} tensors but this model "
            f"is {str(ours).removeprefix('torch.')}: import the task into the model in the "
            "dtype it was saved in, then convert the model (model.to(dtype))"
        )


def _check_fingerprint(
    path: Path,
    what: str,
    metadata: Mapping[str, str],
    expected: str,
    *,
    why: str,
    ours: str,
    fix: str,
) -> None:
    """Refuses a file whose metadata does not carry the pool fingerprint ``expected``.

    The one check of a file's fingerprint, for ``load_model`` and ``import_task``:
    ``why`` says what a mismatch means, ``ours`` whose fingerprint ``expected`` is,
    ``fix`` what to do. The message is one line.
    """
    found = metadata.get("pool_fingerprint")
    if found != expected:
        seen = "none" if found is None else found[:12]
        raise CheckpointError(
            f"{what} {path} {why} (pool fingerprint {seen}, {ours} {expected[:12]}): {fix}"
        )


def _with_batch_counts(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """``tensors`` with each BatchNorm's ``num_batches_tracked`` it lacks taken from
    ``expected`` (a fresh model's: 0).

    A model whose BatchNorms were frozen before saving (``timm.utils.model.freeze``
    turns them into ``FrozenBatchNorm2d``, which has no such counter) saves without
    them. The counter only matters for a cumulative average (``momentum=None``), so
    it is filled in as ``torch.nn.BatchNorm2d`` does for state saved before it had one.
    """
    absent = [
        key for key in expected if key.endswith(".num_batches_tracked") and key not in tensors
    ]
    return {**tensors, **{key: expected[key] for key in absent}} if absent else tensors


def _mismatch(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """The first few missing and unexpected keys, else the first shapes that differ; "" if none."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    shapes = [
        f"{key} has shape {list(tensors[key].shape)}, the model's is {list(expected[key].shape)}"
        for key in sorted(expected)
        if tensors[key].shape != expected[key].shape
    ]
    more = f" (and {len(shapes) - 2} more)" if len(shapes) > 2 else ""
    return "; ".join(shapes[:2]) + more


def load_model(
    directory: str | Path, tasks: Iterable[str] | None = None
) -> tuple[ModularNet, dict[str, Any]]:
    """Loads a model directory (or a run's latest checkpoint), optionally only some tasks.

    ``tasks`` is a task name or names (each loaded once, in the order given); None
    loads every task. Every file must belong to this checkpoint: the pool file and
    each task file carry the pool fingerprint the manifest records, and a file
    copied in from another run is refused before the model is built. (A checkpoint written before
    fingerprints existed has none in its manifest and loads unchecked.)

    Returns:
        The model (in eval mode, in the floating dtype it was saved in: a model saved
        after ``.half()`` loads in float16) and its manifest.

    Raises:
        CheckpointError: The directory holds no complete checkpoint, it is damaged,
            or one of its files was written by another run (one line, naming the file).
    """
    from .run import resolve_model_dir

    directory = resolve_model_dir(directory)
    manifest = read_manifest(directory)
    known = manifest["tasks"]
    if isinstance(tasks, str):  # one name, not its letters
        tasks = [tasks]
    selected = list(known) if tasks is None else list(dict.fromkeys(tasks))
    for name in selected:
        if name not in known:
            raise CheckpointError(f"the checkpoint has no task {name!r}; it has {sorted(known)}")
    names: dict[str | None, str] = {None: SHARED_FILE}  # None: the pool
    for name in selected:
        names[name] = task_file_name(name, known[name])
    paths = {name: directory / file for name, file in names.items()}
    files = {name: _read_file(path, "checkpoint file") for name, path in paths.items()}
    expected = manifest.get("pool_fingerprint")
    if expected is not None:  # written with fingerprints: every file must carry this one
        for name, (_, metadata) in files.items():
            if name is None:
                what, why, ours = "pool file", "was written by another run", "its manifest records"
                fix = (
                    f"restore this checkpoint's own {SHARED_FILE} (task files only work with "
                    "the pool they were trained with)"
                )
            else:
                what, why, ours = "task file", "was written by another run", "this checkpoint's is"
                fix = (
                    f"restore this checkpoint's own {names[name]}, or add the task to a "
                    "model with its own run's pool with modnet.io.import_task"
                )
            _check_fingerprint(paths[name], what, metadata, expected, why=why, ours=ours, fix=fix)
    try:
        model = build(manifest, selected)
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{directory / MANIFEST} describes a model that cannot be built: {error}"
        ) from error
    saved = _saved_dtype(files[None][0])
    if saved is not None and saved != torch.float32:
        model = model.to(saved)  # a model saved in half or bf16 loads as it was saved
    model_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, (tensors, _) in files.items():
        part = {
            k: v
            for k, v in model_state.items()
            if (_is_shared_key(k) if name is None else _is_task_key(k, name))
        }
        tensors = _with_batch_counts(tensors, part)
        problem = _mismatch(tensors, part)
        if problem:
            raise CheckpointError(
                f"checkpoint file {paths[name]} does not match the model {MANIFEST} describes: "
                f"{problem}; restore the checkpoint or write it again"
            )
        state.update(tensors)
    load_state_into(model, state, source=str(directory))
    _record_normalization(model, manifest["tasks"])
    return model.eval(), manifest


def _saved_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most of the pool file's values (``None``: none)."""
    counts: dict[torch.dtype, int] = {}
    for value in tensors.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else None


def _record_normalization(model: ModularNet, info: Mapping[str, Mapping[str, Any]]) -> None:
    """Gives the model each task's input mean/std from its transform record, or else from
    the normalisation a manifest records (``describe``), if any."""
    for name in model.task_names:
        entry = info.get(name) or {}
        for record in (entry.get("transform") or {}, entry.get("normalization") or {}):
            if record.get("mean") is not None and record.get("std") is not None:
                model.set_normalization(name, record["mean"], record["std"])
                break


def load_state_into(model: ModularNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names the checkpoint and the mismatch when it fails."""
    problem = _mismatch(state, model.state_dict())
    if problem:
        raise CheckpointError(f"checkpoint {source} does not match the model: {problem}")
    model.load_state_dict(state, strict=True)


# ------------------------------------------------------------------- task import
def import_task(
    model: ModularNet, source: str | Path, task: str | None = None, name: str | None = None
) -> str:
    """Adds a task saved elsewhere (a task file, or a model/run directory) to ``model``.

    The task file carries the fingerprint of the pool it was trained with; it is
    imported only when ``model``'s pool has the same fingerprint, so the imported
    task computes exactly what it computed where it was trained. Existing tasks
    are untouched. The task's input normalisation comes with it from its model
    directory's manifest (``model.task_normalization``); its dataset and transform
    records stay there: pass them to ``save_model`` as ``task_info`` to keep them.

    Args:
        model: The model to add the task to.
        source: ``tasks/<task>.safetensors`` of a model directory, or a model or run
            directory (then ``task`` names the task in it).
        task: The task to take from a directory source.
        name: Name of the task in ``model`` (default: its name in the source).

    Returns:
        The name of the added task.

    Raises:
        CheckpointError: The file is missing or damaged, carries no fingerprint, holds
            another dtype than ``model``, or was trained with another pool.
        ValueError: ``model`` already has a task of that name.
    """
    path = Path(source)
    record: Mapping[str, Any] = {}
    if path.is_dir():
        from .run import resolve_model_dir

        if task is None:
            raise CheckpointError(f"{path} is a directory: name the task to import (task=...)")
        directory = resolve_model_dir(path)
        known = read_manifest(directory)["tasks"]
        if task not in known:
            raise CheckpointError(f"{path} has no task {task!r}; it has {sorted(known)}")
        record = known[task]
        path = directory / task_file_name(task, record)
    tensors, metadata = _read_file(path, "task file")
    if not record:  # a task file inside a model directory: its manifest's record
        record = _sibling_record(path, metadata.get("task"))
    needed = ("task", "num_classes", "route", "pool_fingerprint")
    if any(key not in metadata for key in needed):
        raise CheckpointError(
            f"task file {path} carries no pool fingerprint (it was written by an older "
            "modnet): save its model again to import it"
        )
    _check_dtype(path, tensors, model)
    _check_fingerprint(
        path,
        "task file",
        metadata,
        pool_fingerprint(model),
        why="was trained with another pool",
        ours="this model's pool is",
        fix="a task only works with the exact pool it was trained with",
    )
    old, new = metadata["task"], name or metadata["task"]
    model.add_task(
        new, int(metadata["num_classes"]), route=route_from_spec(json.loads(metadata["route"]))
    )
    renamed = {}
    for key, value in tensors.items():
        prefix = next((p for p in TASK_PREFIXES if key.startswith(f"{p}{old}.")), None)
        renamed[key if prefix is None else f"{prefix}{new}.{key[len(prefix) + len(old) + 1 :]}"] = (
            value
        )
    problem = _mismatch(
        renamed, {k: v for k, v in model.state_dict().items() if _is_task_key(k, new)}
    )
    if problem:
        for modules in (model.routes, model.heads, model.norm_stats):
            del modules[new]  # leave the model as it was
        raise CheckpointError(
            f"task file {path} does not hold the tensors of a task of this model: {problem}"
        )
    model.load_state_dict(renamed, strict=False)
    _record_normalization(model, {new: record})
    return new


def _sibling_record(path: Path, task: str | None) -> Mapping[str, Any]:
    """What the manifest of the model directory holding task file ``path`` records
    about ``task`` (empty when the file stands alone or the manifest cannot be read)."""
    if task is None or path.parent.name != TASK_DIR:
        return {}
    try:
        entry = read_manifest(path.parent.parent)["tasks"].get(task, {})
    except (CheckpointError, OSError):
        return {}
    return entry if task_file_name(task, entry) == f"{TASK_DIR}/{path.name}" else {}
