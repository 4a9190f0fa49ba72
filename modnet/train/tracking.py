"""Where a run's metrics go while it trains: ``metrics.jsonl`` always, TensorBoard on request.

``metrics.jsonl`` (one JSON record per line) is the run's own record, read by
``modnet plot`` and kept by every run. ``--log tensorboard`` also writes
TensorBoard event files under ``RUN/tensorboard/<phase>/`` with
``torch.utils.tensorboard.SummaryWriter``: the scalars ``loss``, ``lr``,
``samples_per_s`` and ``accuracy/<task>``, and at every evaluation the route
heatmaps as the image ``routes``. Watch a run with ``tensorboard --logdir RUN``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.run import EVENT_FILE_PREFIX
from ..plot import (
    CHECKPOINT_EVENT,
    DISCARD_EVENT,
    METRICS_FILE,
    START_EVENT,
    route_figure,
    route_kind,
    route_matrix,
)

TENSORBOARD_DIR = "tensorboard"
LOGGERS = ("jsonl", "tensorboard")
EXTRA_HINT = 'pip install "modnet[tensorboard]"'


def discard_events(run_dir: str | Path, phase: str, since: float | None) -> list[Path]:
    """Removes the TensorBoard event files of ``phase``'s attempts started after
    ``since`` (seconds since the epoch; None: every attempt), for ``modnet discard``.

    ``SummaryWriter`` names each file after the second it was created
    (``events.out.tfevents.<time>.<host>...``), so an attempt started after the
    checkpoint a run goes back to is told from a finished attempt before it; the
    earlier attempt's curves, hidden by the discarded one's purge, show again. Only
    event files go (and the phase's folder, once empty).

    Returns:
        The files removed.
    """
    folder = Path(run_dir) / TENSORBOARD_DIR / phase
    if not folder.is_dir():
        return []
    removed = []
    for file in sorted(folder.glob(f"{EVENT_FILE_PREFIX}*")):
        parts = file.name.split(".")
        created = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else None
        if file.is_file() and created is not None and (since is None or created > since):
            file.unlink()
            removed.append(file)
    if not any(folder.iterdir()):
        folder.rmdir()
    return removed


class MetricsLogger:
    """Appends every record to ``run_dir/metrics.jsonl``.

    Args:
        run_dir: The run directory (created if missing).
        phase: The training phase (``"train"``, ``"transfer-kmnist"``, ...).
    """

    def __init__(self, run_dir: str | Path, phase: str):
        self.run_dir = Path(run_dir)
        self.phase = phase

    def log(self, record: dict[str, Any], model=None) -> None:
        """Writes one record: ``step`` with ``loss``/``lr``/``samples_per_s``, or with
        ``accuracy`` (task -> test accuracy). ``model`` is the model being trained."""
        self._append(record)

    def start(self) -> None:
        """Marks a fresh start of the phase (not a resume): the record
        ``{"phase": ..., "event": "start"}``, after which ``modnet.plot.read_metrics``
        drops the phase's earlier records. A retried phase (``transfer --overwrite``)
        appends its records after the replaced attempt's; the file is only appended
        to, so a crash at any moment keeps every record written."""
        self._append({"phase": self.phase, "event": START_EVENT})

    def checkpointed(self, step: int) -> None:
        """Marks that the run now holds this attempt's weights, from its checkpoint at
        ``step``: written after each checkpoint and when the attempt resumes from or
        completes one. Until then ``read_metrics`` keeps showing the earlier attempt
        the run holds (a retry stopped before its first checkpoint changed nothing)."""
        self._append({"phase": self.phase, "event": CHECKPOINT_EVENT, "step": step})

    def discarded(self) -> None:
        """Marks the phase's last attempt as dropped by ``modnet discard``: its records
        stay in the file, and ``read_metrics`` goes back to the attempt before it."""
        self._append({"phase": self.phase, "event": DISCARD_EVENT})

    def _append(self, record: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Releases what the logger holds (nothing for the JSON lines file)."""


class TensorBoardLogger(MetricsLogger):
    """``metrics.jsonl`` plus TensorBoard scalars and route heatmaps for one phase.

    Args:
        run_dir: The run directory.
        phase: The training phase; its events go to ``run_dir/tensorboard/<phase>/``.
        step: The first step this attempt logs (0 for a fresh start, the resumed
            checkpoint's step + 1): events of an earlier attempt from this step on are
            purged in TensorBoard (``SummaryWriter(purge_step=...)``).

    Raises:
        ConfigError: if TensorBoard is not installed (it is the optional extra
            ``modnet[tensorboard]``).
    """

    def __init__(self, run_dir: str | Path, phase: str, step: int = 0):
        super().__init__(run_dir, phase)
        summary_writer = require_tensorboard()
        self.log_dir = self.run_dir / TENSORBOARD_DIR / phase
        # TensorBoard hides the events an earlier attempt of the phase logged at or
        # after ``step``: a retried phase (0) or the steps after a resumed checkpoint.
        self.writer = summary_writer(log_dir=str(self.log_dir), purge_step=step)

    def log(self, record: dict[str, Any], model=None) -> None:
        super().log(record, model)
        step = int(record["step"])
        for key in ("loss", "lr", "samples_per_s"):
            if key in record:
                self.writer.add_scalar(key, float(record[key]), step)
        accuracy = record.get("accuracy") or {}
        for task, value in accuracy.items():
            self.writer.add_scalar(f"accuracy/{task}", float(value), step)
        if accuracy and model is not None and model.task_names:
            self.writer.add_figure("routes", _routes_figure(model), step, close=False)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(kind: str, run_dir: str | Path, phase: str, step: int = 0) -> MetricsLogger:
    """The logger for ``--log KIND``: ``"jsonl"`` (the default) or ``"tensorboard"``,
    for an attempt of a phase whose first logged step is ``step`` (see ``TensorBoardLogger``).

    Raises:
        ConfigError: for an unknown kind, or ``"tensorboard"`` without TensorBoard.
    """
    check_logger(kind)
    if kind == "tensorboard":
        return TensorBoardLogger(run_dir, phase, step)
    return MetricsLogger(run_dir, phase)


def check_logger(kind: str) -> None:
    """Fails before any work when ``--log KIND`` cannot be honoured.

    Raises:
        ConfigError: for an unknown kind, or ``"tensorboard"`` without TensorBoard.
    """
    if kind not in LOGGERS:
        raise ConfigError(f"unknown --log {kind!r}: choose one of {', '.join(LOGGERS)}")
    if kind == "tensorboard":
        require_tensorboard()


def require_tensorboard():
    """``torch.utils.tensorboard.SummaryWriter``, imported on first use.

    Raises:
        ConfigError: naming the extra to install when TensorBoard is missing.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(
            f"--log tensorboard needs TensorBoard, which is not installed: {EXTRA_HINT}"
        ) from error
    return SummaryWriter


def _routes_figure(model):
    tasks = model.task_names
    return route_figure(
        {t: route_matrix(model, t) for t in tasks}, {t: route_kind(model, t) for t in tasks}
    )
