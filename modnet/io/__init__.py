"""Checkpoints and run directories.

- ``fs``: atomic, durable writes (fsync of files and directories) and the run lock.
- ``checkpoint``: model directories (pool file, one file per task, manifest), the
  pool fingerprint and importing a task from another model with the same pool.
- ``run``: run directories: marker, lock, phases, ``LATEST`` recovery, pruning of
  only what modnet wrote, results.
"""

from ..errors import CheckpointError
from .checkpoint import (
    FORMAT,
    MANIFEST,
    SHARED_FILE,
    TASK_DIR,
    TASK_PREFIXES,
    build,
    describe,
    import_task,
    load_model,
    load_state_into,
    pool_fingerprint,
    read_manifest,
    save_model,
)
from .fs import atomic_write, atomic_write_text, fsync_path, write_json
from .run import (
    CHECKPOINTS,
    LATEST,
    MARKER,
    RESULTS_FILE,
    TRAINER_STATE,
    RecoveryWarning,
    changed_options,
    check_run_target,
    discard_unfinished,
    is_run_dir,
    latest_checkpoint,
    load_trainer_state,
    mark_outdated,
    modnet_checkpoints,
    open_run,
    read_results,
    record_results,
    refuse_other_phase,
    resolve_model_dir,
    run_state,
    save_checkpoint,
    unfinished_phase,
)

__all__ = [
    "CHECKPOINTS",
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "MARKER",
    "RESULTS_FILE",
    "SHARED_FILE",
    "TASK_DIR",
    "TASK_PREFIXES",
    "TRAINER_STATE",
    "CheckpointError",
    "RecoveryWarning",
    "atomic_write",
    "atomic_write_text",
    "build",
    "changed_options",
    "check_run_target",
    "describe",
    "discard_unfinished",
    "fsync_path",
    "import_task",
    "is_run_dir",
    "latest_checkpoint",
    "load_model",
    "load_state_into",
    "load_trainer_state",
    "mark_outdated",
    "modnet_checkpoints",
    "open_run",
    "pool_fingerprint",
    "read_manifest",
    "read_results",
    "record_results",
    "refuse_other_phase",
    "resolve_model_dir",
    "run_state",
    "save_checkpoint",
    "save_model",
    "unfinished_phase",
    "write_json",
]
