"""Run directories: what modnet owns in them, and the rules that keep them whole.

A *run directory* holds::

    .modnet-run            marker, written first: only a directory carrying it (or an
                           older run with checkpoints) is ever written to or cleared
    .lock, .lock.info      OS lock held by the one process writing the run, and who it is
    checkpoints/<phase>-step<N>/   model directories (see ``checkpoint``) plus
                           ``trainer_state.pt`` for resuming
    LATEST                 the name of the newest complete checkpoint
    results.json, metrics.jsonl, routes.png, routes.txt, <phase>-routes.png,
    config*.yaml, export/, tensorboard/

Rules:

- modnet deletes or prunes only what it wrote: checkpoint folders with its naming
  pattern and a manifest inside, the output files listed in ``OUTPUTS`` and
  ``PHASE_OUTPUT``, and its own files in the folders of ``OUTPUT_FOLDERS``.
- One writer at a time (``open_run`` takes an OS lock, released when the process
  dies, so a killed run never blocks its resume).
- A missing or damaged ``LATEST`` is recovered from the newest complete checkpoint,
  never taken as an empty run.
- Every checkpoint records its phase (``train``, ``transfer-<task>``, ``adapt-<task>``),
  whether the phase finished, and a sequence number; an unfinished phase blocks every
  other phase until it is finished or discarded (``discard_unfinished``).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, RunDirError
from ..model import ModularNet
from .checkpoint import (
    FORMAT,
    MANIFEST,
    SHARED_FILE,
    TRAINER_STATE,
    _foreign_entries,
    _save_model_dir,
)
from .fs import (
    LEFTOVER,
    LOCK_FILE,
    LOCK_INFO,
    atomic_write_text,
    exclusive_lock,
    legacy_leftover_of,
    remove_leftovers,
    write_json,
)

MARKER = ".modnet-run"
RUN_FORMAT = "modnet-run/1"
CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
RESULTS_FILE = "results.json"
# The files modnet writes at the top of a run directory: all that --overwrite removes.
OUTPUTS = (
    LATEST,
    RESULTS_FILE,
    "metrics.jsonl",
    "routes.png",
    "routes.txt",
    "curves.png",
    "config.yaml",
)
# Per-phase outputs: adapt's relation figure, a phase's saved options.
PHASE_OUTPUT = re.compile(
    r"^((transfer|adapt)-[A-Za-z0-9_\-]+-routes\.png|config-(transfer|adapt)-[A-Za-z0-9_\-]+\.yaml)$"
)
# Folders that hold modnet's files among whatever else the user keeps there: per
# folder, the names of modnet's files in it (``export/<task>.pt2``,
# ``export/<task>/model.safetensors`` and ``config.json``, TensorBoard event files).
EVENT_FILE_PREFIX = "events.out.tfevents."  # TensorBoard's SummaryWriter files
OUTPUT_FOLDERS = {
    "export": re.compile(r"^([^/]+\.pt2|[^/]+/(model\.safetensors|config\.json))$"),
    "tensorboard": re.compile(rf"^([^/]+/)?{re.escape(EVENT_FILE_PREFIX)}[^/]+$"),
}
SAVED_OPTIONS_HEADER = "# modnet "  # the first line of every options file modnet saves
CHECKPOINT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*-step\d{7}$")
KEEP = 2  # how many of the newest checkpoints pruning keeps (see ``save_checkpoint``)


class RecoveryWarning(UserWarning):
    """A run directory was read or repaired in a way the user should know about."""


# ---------------------------------------------------------------------- ownership
def is_run_dir(path: str | Path) -> bool:
    """Whether modnet wrote ``path`` as a run directory: its marker, or an older run's
    checkpoints (a ``checkpoints/`` folder holding a checkpoint modnet wrote). A file
    named ``LATEST`` proves nothing: anyone's folder may hold one."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    return bool(modnet_checkpoints(path, incomplete=True))


def check_run_target(path: str | Path) -> None:
    """Refuses a path modnet must not write a run into: a file, or someone else's folder.

    Raises:
        RunDirError: ``path`` is a file, or a non-empty directory modnet did not write.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory: choose another --out")
    if path.is_dir() and not _new_folder(path) and not is_run_dir(path):
        raise RunDirError(
            f"{path} is not a modnet run directory (it has no {MARKER} marker) and is not "
            "empty: modnet writes runs only into new or empty folders and its own runs; "
            "choose another --out"
        )


def _new_folder(path: Path) -> bool:
    """Whether ``path`` holds nothing but modnet's lock files and what a killed write
    left (a run killed while creating it): a new run may start there."""
    return all(
        entry.name in (LOCK_FILE, LOCK_INFO) or _top_leftover(entry.name)
        for entry in path.iterdir()
    )


def _top_leftover(name: str) -> bool:
    """Whether ``name`` at the top of a run is a leftover of a killed modnet write."""
    if LEFTOVER.match(name):
        return True
    legacy = legacy_leftover_of(name)  # older versions wrote files there, never folders
    return legacy is not None and legacy[1] == "tmp" and _top_level_name(legacy[0])


def _checkpoint_leftover(name: str) -> bool:
    """Whether ``name`` in ``checkpoints/`` is an older modnet's leftover of a checkpoint."""
    legacy = legacy_leftover_of(name)
    return legacy is not None and bool(CHECKPOINT_NAME.match(legacy[0]))


def _top_level_name(name: str) -> bool:
    """Whether modnet writes a file named ``name`` at the top of a run."""
    return name == MARKER or name in OUTPUTS or bool(PHASE_OUTPUT.match(name))


@contextmanager
def open_run(
    path: str | Path, command: str, overwrite: bool = False, enabled: bool = True
) -> Iterator[Path]:
    """Opens ``path`` for writing a run: checks it, marks it, locks it, tidies it.

    Within the block this process is the run's only writer. Leftovers of a killed
    write are removed first, and a pruning a kill left unfinished is finished (see
    ``save_checkpoint``); with ``overwrite`` every output modnet wrote is removed
    (nothing else), without reading the old state, so a damaged run can be replaced.

    Args:
        path: The run directory (created if missing).
        command: What is writing (``modnet train``), recorded for a second writer's error.
        overwrite: Start afresh.
        enabled: ``False`` on the processes of a data-parallel job that do not write.

    Raises:
        RunDirError: Not a run directory, or another process is writing it.
    """
    path = Path(path)
    if not enabled:
        yield path
        return
    check_run_target(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(path, command):
            tidy(path)
            if not (path / MARKER).is_file():
                write_json(path / MARKER, {"format": RUN_FORMAT, "created": time.time()})
            latest = _pointed_checkpoint(path)
            if latest is not None:
                _prune(path, keep=KEEP, protect=latest.name)
            if overwrite:
                clear_run(path)
            read_results(path)  # a damaged results.json is named before any work
            yield path
    except BaseException:
        # A command that failed before writing anything leaves no folder behind.
        if created and {p.name for p in path.iterdir()} <= {MARKER, LOCK_FILE, LOCK_INFO}:
            shutil.rmtree(path, ignore_errors=True)
        raise


def tidy(path: Path) -> list[Path]:
    """Removes what killed writes left behind; returns them.

    Those are names with modnet's temporary marks; the marks of older versions
    (``.results.tmp-<pid>.json``), which a user's hidden files may carry too, only
    where modnet wrote the name: a top-level output's, a checkpoint's in
    ``checkpoints/``, anything inside a checkpoint folder modnet wrote.
    """
    removed = remove_leftovers(path, legacy=_top_leftover)
    removed += remove_leftovers(path / CHECKPOINTS, legacy=_checkpoint_leftover)
    for checkpoint in modnet_checkpoints(path, incomplete=True):
        removed += remove_leftovers(checkpoint, legacy=lambda n: True)
    return removed


def clear_run(path: Path) -> None:
    """Removes every output and checkpoint modnet wrote in the run; leaves anything else.

    Saved options files count as modnet's only with the header modnet writes; in
    ``export/`` and ``tensorboard/`` only modnet's file names go, and then the
    folders left empty."""
    for entry in path.iterdir():
        if entry.name in OUTPUTS or PHASE_OUTPUT.match(entry.name):
            if entry.is_symlink() or (entry.is_file() and _written_by_modnet(entry)):
                entry.unlink()
    for name, pattern in OUTPUT_FOLDERS.items():
        folder = path / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        for file in sorted(folder.rglob("*"), reverse=True):  # files before their folders
            inside = file.relative_to(folder).as_posix()
            if file.is_file() and not file.is_symlink() and pattern.match(inside):
                file.unlink()
            elif file.is_dir() and not file.is_symlink() and not any(file.iterdir()):
                file.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()
    checkpoints = path / CHECKPOINTS
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if CHECKPOINT_NAME.match(entry.name) and (entry / MANIFEST).is_file():
                shutil.rmtree(entry)
        if not any(checkpoints.iterdir()):
            checkpoints.rmdir()


def _written_by_modnet(file: Path) -> bool:
    """A run's top-level output that modnet wrote: any of its names, except saved
    options files without modnet's header (a user's ``config.yaml``)."""
    if file.suffix != ".yaml":
        return True
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith(SAVED_OPTIONS_HEADER)
    except OSError:
        return False


# -------------------------------------------------------------------- checkpoints
def checkpoint_record(checkpoint: Path) -> dict[str, Any] | None:
    """What a checkpoint says about itself: sequence, phase, done; None if not modnet's.

    ``complete`` says whether it holds every file it was saved with: older versions
    renamed a checkpoint into place before writing its trainer state into it, so a
    kill could leave one without. Every checkpoint of an unfinished phase, and of
    a phase other than a statistics-only adaptation, has a trainer state; newer
    checkpoints record whether they have one (``trainer_state``).
    """
    try:
        manifest = json.loads((Path(checkpoint) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    record = manifest.get("checkpoint")
    if not isinstance(record, dict):  # written before checkpoints recorded themselves
        state = _trainer_state_or_none(Path(checkpoint))
        record = dict(
            sequence=0,
            phase=state.get("phase") if state else None,
            done=bool(state.get("done", True)) if state else True,
        )
    record = dict(record)
    record["mtime"] = (Path(checkpoint) / MANIFEST).stat().st_mtime
    has_state = (Path(checkpoint) / TRAINER_STATE).is_file()
    if "trainer_state" in record:
        record["complete"] = has_state or not record["trainer_state"]
    else:
        stateless = record["done"] and str(record["phase"]).startswith("adapt-")
        record["complete"] = has_state or stateless or record["phase"] is None
    return record


def modnet_checkpoints(run_dir: str | Path, incomplete: bool = False) -> list[Path]:
    """Complete checkpoints modnet wrote in ``run_dir``, oldest first.

    Args:
        run_dir: The run directory.
        incomplete: Also those lacking their trainer state (``checkpoint_record``).
    """
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        record = checkpoint_record(entry)
        if record is not None and (incomplete or record["complete"]):
            found.append((record.get("sequence", 0), record["mtime"], entry))
    return [entry for *_, entry in sorted(found, key=lambda item: item[:2])]


def latest_checkpoint(run_dir: str | Path, repair: bool = False) -> Path | None:
    """The run's newest complete checkpoint, or None for a run that has none yet.

    When ``LATEST`` is missing or names no complete checkpoint, the newest complete
    checkpoint is used instead, with a ``RecoveryWarning`` naming it; ``repair``
    also rewrites ``LATEST`` (only a process holding the run's lock may do that).

    Raises:
        CheckpointError: ``LATEST`` is damaged and no complete checkpoint is left.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    target = _pointed_checkpoint(run_dir)
    if target is not None:
        return target
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", "replace").strip()
        problem = f"{pointer} names {name[:80]!r}, which is not a complete checkpoint"
    else:
        problem = f"{pointer} is missing"
    candidates = modnet_checkpoints(run_dir)
    if not candidates:
        if pointer.is_file():
            raise CheckpointError(f"{problem}, and {run_dir} holds no complete checkpoint")
        return None
    newest = candidates[-1]
    if repair:
        atomic_write_text(pointer, newest.name + "\n")
        message = f"{problem}: recovered it, it now names the newest complete checkpoint"
    else:
        message = f"{problem}: using the newest complete checkpoint"
    warnings.warn(f"{message} {newest.name}", RecoveryWarning, stacklevel=2)
    return newest


def _pointed_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint ``LATEST`` names, or None (missing, or names none)."""
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode("utf-8", "replace").strip()
    target = run_dir / CHECKPOINTS / name
    if not name or "/" in name or name.startswith("."):
        return None
    record = checkpoint_record(target)
    return target if record is not None and record["complete"] else None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory itself, or the latest checkpoint of a run directory.

    Raises:
        CheckpointError: ``path`` holds neither.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist: give a run directory of `modnet train` (or a model "
            "directory inside it)"
        )
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file: give a run or model directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} holds no modnet checkpoint (no {MANIFEST} and no {LATEST}): "
            "train one with `modnet train --out DIR`"
        )
    return latest


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    model: ModularNet,
    trainer_state: Mapping[str, Any] | None = None,
    task_info: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = KEEP,
) -> Path:
    """Writes ``checkpoints/<name>`` completely and durably, then points ``LATEST`` at it.

    Every file of the checkpoint, its trainer state included, is written and
    flushed under a temporary name before the folder is renamed into place, so a
    checkpoint is visible only complete. A checkpoint of the same name is replaced;
    anything else there (a user's file or folder) is refused.

    The checkpoint records its phase (the name up to ``-step``, or
    ``trainer_state["phase"]``), whether the phase is done and a sequence number.
    Afterwards, modnet's checkpoints beyond the newest ``keep`` are pruned, except
    the newest one of a finished phase (what an unfinished phase started from, kept
    so that it can be discarded).

    Raises:
        RunDirError: ``checkpoints/<name>`` holds something modnet did not write.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MARKER).is_file():
        check_run_target(run_dir)
        write_json(run_dir / MARKER, {"format": RUN_FORMAT, "created": time.time()})
    existing = [checkpoint_record(p) for p in modnet_checkpoints(run_dir)]
    sequence = 1 + max([r.get("sequence", 0) for r in existing if r] or [0])
    state = dict(trainer_state or {})
    record = dict(
        sequence=sequence,
        phase=state.get("phase", name.rsplit("-step", 1)[0]),
        done=bool(state.get("done", True)),
        trainer_state=trainer_state is not None,
    )
    target = run_dir / CHECKPOINTS / name
    if target.is_symlink() or (
        target.exists() and (not target.is_dir() or _foreign_entries(target))
    ):
        raise RunDirError(
            f"{target} is not a checkpoint modnet wrote, but this run writes its checkpoint "
            f"{name} there: move it out of {target.parent} and run the command again (it "
            "continues from the last checkpoint)"
        )
    files = {}
    if trainer_state is not None:
        files[TRAINER_STATE] = lambda path: torch.save(dict(trainer_state), path)
    _save_model_dir(model, target, task_info, {**dict(extra or {}), "checkpoint": record}, files)
    atomic_write_text(run_dir / LATEST, name + "\n")
    _prune(run_dir, keep=keep, protect=name)
    return target


def _prune(run_dir: Path, keep: int, protect: str) -> None:
    """Removes modnet's checkpoints beyond the newest ``keep`` (``save_checkpoint``),
    and incomplete ones older than ``protect``."""
    checkpoints = modnet_checkpoints(run_dir)
    finished = [p for p in checkpoints if checkpoint_record(p)["done"]]
    keep_names = {protect, *(p.name for p in checkpoints[-keep:])}
    if finished:
        keep_names.add(finished[-1].name)
    newest = checkpoint_record(run_dir / CHECKPOINTS / protect)
    incomplete = [
        p
        for p in modnet_checkpoints(run_dir, incomplete=True)
        if not checkpoint_record(p)["complete"]
        and checkpoint_record(p)["sequence"] < (newest or {}).get("sequence", 0)
    ]
    for old in checkpoints + incomplete:
        if old.name not in keep_names and CHECKPOINT_NAME.match(old.name):
            shutil.rmtree(old, ignore_errors=True)


def _trainer_state_or_none(checkpoint: Path) -> dict[str, Any] | None:
    try:
        return load_trainer_state(checkpoint)
    except CheckpointError:
        return None


def load_trainer_state(checkpoint: Path) -> dict[str, Any] | None:
    """The trainer state saved with a checkpoint, or None (a finished, stateless phase).

    Raises:
        CheckpointError: The file is damaged (the message names it).
    """
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises several types for damaged pickles
        raise CheckpointError(f"trainer state {path} is corrupted: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer state {path} is damaged: it holds no dictionary")
    return state


# ------------------------------------------------------------------------- phases
def run_state(run_dir: Path, repair: bool = True) -> tuple[Path | None, dict[str, Any] | None]:
    """The latest checkpoint (``LATEST`` repaired if needed and ``repair``) and its state."""
    latest = latest_checkpoint(run_dir, repair=repair) if Path(run_dir).is_dir() else None
    return latest, load_trainer_state(latest) if latest is not None else None


def unfinished_phase(state: Mapping[str, Any] | None) -> str | None:
    """The phase a trainer state left unfinished, or None."""
    if state is None or state.get("done", True):
        return None
    return str(state["phase"])


def run_root(path: str | Path) -> Path:
    """The run a path names: ``path`` itself, or the run of a checkpoint inside it
    (``RUN/checkpoints/<name>``)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINTS else path


def partly_trained(
    path: str | Path, manifest: Mapping[str, Any], tasks: Iterable[str] | None = None
) -> str | None:
    """Which tasks of a loaded model an unfinished phase left partly trained, said in
    a sentence for eval's note and export's refusal; ``None`` when none is.

    The tasks are those the unfinished phase trains (each task's manifest record
    names its phase); when the phase has already changed a shared value that the
    last finished checkpoint holds (templates, trunk, hypernetwork), every task
    is. Shared values the phase only added (the templates of ``--grow``) leave
    the other tasks as they were.

    Args:
        path: The run, or a checkpoint inside it, that ``manifest`` was loaded from.
        manifest: The loaded checkpoint's manifest (``load_model``).
        tasks: The tasks in question (default: all of the manifest's).
    """
    record = manifest.get("checkpoint")
    if not isinstance(record, dict) or record.get("done", True):
        return None
    phase = str(record.get("phase"))
    run = run_root(path)
    records = manifest.get("tasks", {})
    names = [n for n, t in records.items() if isinstance(t, dict) and t.get("phase") == phase]
    finished = [
        c for c in modnet_checkpoints(run) if (checkpoint_record(c) or {}).get("done", False)
    ]
    if finished and phase != "train":
        before = json.loads((finished[-1] / MANIFEST).read_text()).get("pool_fingerprint")
        if before != manifest.get("pool_fingerprint") and not _shared_values_kept(
            finished[-1], resolve_model_dir(path)
        ):
            names = list(records)
    wanted = None if tasks is None else set(tasks)
    names = [n for n in names if wanted is None or n in wanted]
    if not names:
        return None
    return (
        f"the phase {phase!r} of {run} is unfinished, so {', '.join(names)} "
        f"{'is' if len(names) == 1 else 'are'} partly trained: run its command again to "
        f"finish it, or `modnet discard {run}`"
    )


def _shared_values_kept(before: Path, after: Path) -> bool:
    """Whether every shared tensor of checkpoint ``before`` is in ``after``, bit for bit
    (``after`` may hold more: templates a phase added)."""
    try:
        with (
            safe_open(before / SHARED_FILE, framework="pt") as old,
            safe_open(after / SHARED_FILE, framework="pt") as new,
        ):
            if not set(old.keys()) <= set(new.keys()):
                return False
            for key in old.keys():
                a, b = old.get_tensor(key), new.get_tensor(key)
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    return False
    except (OSError, ValueError, SafetensorError):
        return False
    return True


def refuse_other_phase(run_dir: Path, state: Mapping[str, Any] | None, phase: str) -> None:
    """Raises when the run has an unfinished phase other than ``phase``.

    Raises:
        RunDirError: Naming the unfinished phase, how far it got, and both ways out.
    """
    other = unfinished_phase(state)
    if other is None or other == phase:
        return
    raise RunDirError(
        f"{run_dir} has an unfinished phase {other!r} (step {state['step']} of "
        f"{state['total_steps']}): finish it first by running its command again, or discard "
        f"it with `modnet discard {run_dir}` (finished tasks stay exactly as they are)"
    )


def changed_options(
    stored: Mapping[str, Any], new: Mapping[str, Any], ignore: frozenset[str] = frozenset()
) -> list[str]:
    """``"name: old -> new"`` for every option that differs (JSON-normalised), sorted."""
    stored, new = json.loads(json.dumps(dict(stored))), json.loads(json.dumps(dict(new)))
    return [
        f"{key}: {stored.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(stored) | set(new))
        if key not in ignore and stored.get(key) != new.get(key)
    ]


def discard_unfinished(run_dir: str | Path) -> tuple[str, Path | None]:
    """Discards the run's unfinished phase: its checkpoints go, ``LATEST`` moves back.

    ``LATEST`` then names the newest checkpoint of a finished phase, whose files
    are not touched, so every finished task stays bit-identical. Takes the lock.

    Returns:
        The discarded phase and the checkpoint the run now continues from (None
        when the discarded phase was the first one).

    Raises:
        RunDirError: Nothing to discard, or another process is writing the run.
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise RunDirError(f"{run_dir} is not a modnet run directory: nothing to discard")
    with open_run(run_dir, "modnet discard"):
        latest, state = run_state(run_dir)
        phase = unfinished_phase(state)
        if phase is None:
            raise RunDirError(f"{run_dir} has no unfinished phase: nothing to discard")
        records = {p: checkpoint_record(p) for p in modnet_checkpoints(run_dir)}
        current = records[latest]["sequence"] if latest in records else 0
        bases = [p for p, r in records.items() if r["done"] and r["sequence"] < current]
        base = bases[-1] if bases else None
        floor = records[base]["sequence"] if base is not None else 0
        for path, record in records.items():
            if record["sequence"] > floor:
                shutil.rmtree(path)
        if base is None:
            (run_dir / LATEST).unlink(missing_ok=True)
        else:
            atomic_write_text(run_dir / LATEST, base.name + "\n")
        return phase, base


# ------------------------------------------------------------------------ results
def read_results(run_dir: Path) -> dict[str, Any]:
    """``results.json`` of the run (empty when missing).

    Raises:
        RunDirError: The file is damaged, or not a file; the message names it.
    """
    path = Path(run_dir) / RESULTS_FILE
    if path.is_dir() or path.is_symlink() and not path.exists():
        raise RunDirError(
            f"{path} is not a file (modnet records the run's results in it): move it away "
            "and run the command again"
        )
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RunDirError(
            f"{path} is damaged ({error}): repair it, or move it away and run the phase's "
            "command again to record its results anew"
        ) from None
    if not isinstance(results, dict):
        raise RunDirError(f"{path} is damaged (not a JSON object): repair it or move it away")
    return results


# What a command writes beside a phase's results (its options file): see ``with_results``.
_WITH_RESULTS: ContextVar[Callable[[Path, str, Mapping[str, Any]], None] | None] = ContextVar(
    "modnet_with_results", default=None
)


@contextmanager
def with_results(write: Callable[[Path, str, Mapping[str, Any]], None]) -> Iterator[None]:
    """Within the block, ``record_results`` calls ``write(run_dir, phase, entry)`` first.

    A phase is complete once ``results.json`` holds its entry; a rerun of a phase
    stopped before that writes the missing results. What a command writes with the
    results (``modnet transfer``'s ``config-<phase>.yaml``) is therefore written just
    before them, so no interrupt leaves a complete phase without it.
    """
    token = _WITH_RESULTS.set(write)
    try:
        yield
    finally:
        _WITH_RESULTS.reset(token)


def record_results(run_dir: Path, phase: str, entry: Mapping[str, Any]) -> None:
    """Adds (or replaces) ``phase``'s entry in ``results.json``, atomically (after what
    ``with_results`` asks to write with it)."""
    write = _WITH_RESULTS.get()
    if write is not None:
        write(Path(run_dir), phase, entry)
    results = read_results(run_dir)
    results[phase] = dict(entry)
    write_json(Path(run_dir) / RESULTS_FILE, results)


def task_phase(run_dir: Path, manifest: Mapping[str, Any], name: str) -> str:
    """The phase that trained task ``name``: ``"train"``, ``"transfer-<name>"`` or
    ``"adapt-<name>"``, as the manifest records it; for runs saved before it did,
    ``train`` if ``results.json``'s train phase scored the task, else by ``adapted_from``."""
    entry = manifest["tasks"][name]
    if entry.get("phase") is not None:
        return entry["phase"]
    if name in read_results(run_dir).get("train", {}).get("accuracy", {}):
        return "train"
    return f"adapt-{name}" if "adapted_from" in entry else f"transfer-{name}"


def mark_outdated(run_dir: Path, tasks: Iterable[str], phase: str) -> None:
    """Marks the accuracies that ``results.json`` holds for ``tasks`` from phases before
    ``phase`` as outdated: ``phase`` changed what those tasks share (``--update-shared``).

    Each such entry gains ``"outdated": {task: phase}``; its accuracies stay as they were.
    """
    results = read_results(run_dir)
    for name, entry in results.items():
        if name == phase or not isinstance(entry, dict):
            continue
        hit = [t for t in tasks if t in entry.get("accuracy", {})]
        if hit:
            entry["outdated"] = {**entry.get("outdated", {}), **dict.fromkeys(hit, phase)}
    write_json(Path(run_dir) / RESULTS_FILE, results)


def note(message: str) -> None:
    """A one-line notice on stderr for what a command did on its own (recovered, completed)."""
    print(f"modnet: {message}", file=sys.stderr)


__all__ = [
    "CHECKPOINTS",
    "LATEST",
    "LOCK_FILE",
    "LOCK_INFO",
    "MARKER",
    "OUTPUTS",
    "RESULTS_FILE",
    "TRAINER_STATE",
    "RecoveryWarning",
    "changed_options",
    "check_run_target",
    "checkpoint_record",
    "clear_run",
    "discard_unfinished",
    "is_run_dir",
    "latest_checkpoint",
    "load_trainer_state",
    "mark_outdated",
    "modnet_checkpoints",
    "open_run",
    "partly_trained",
    "read_results",
    "record_results",
    "refuse_other_phase",
    "resolve_model_dir",
    "run_root",
    "run_state",
    "save_checkpoint",
    "task_phase",
    "tidy",
    "unfinished_phase",
]
