"""Figures of a run with matplotlib: route heatmaps and learning curves.

Route heatmaps show, per task, a ``[layers, templates]`` matrix of template shares
(one row per layer, summing to 1): the picture of modules organising themselves
across tasks. Learning curves read a run's ``metrics.jsonl``: training loss, test
accuracy per task and learning rate against the training step.

Figures are drawn with matplotlib's object-oriented API (``Figure`` with the Agg
canvas), so plotting never touches pyplot's global state or needs a display;
matplotlib itself is imported on the first figure.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .io.fs import atomic_write, atomic_write_text
from .model import ModularNet
from .routing import HardRoute

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn, not with the CLI
    from matplotlib.figure import Figure

ROUTES_PNG = "routes.png"
ROUTES_TXT = "routes.txt"
CURVES_PNG = "curves.png"
METRICS_FILE = "metrics.jsonl"
# The record a phase writes when it starts afresh (see ``read_metrics``).
START_EVENT = "start"
# The record ``modnet discard`` writes for the attempt of a phase it drops.
DISCARD_EVENT = "discarded"
# The record an attempt writes once the run holds its weights: after each checkpoint,
# and when it resumes from or completes one.
CHECKPOINT_EVENT = "checkpoint"
COLORMAP = "Blues"
MAX_COLUMNS = 6  # route panels per row


@torch.no_grad()
def route_matrix(model: ModularNet, task: str) -> torch.Tensor:
    """A task's route as template shares.

    Args:
        model: The model holding ``task``.
        task: Task name.

    Returns:
        ``[layers, templates]`` float32 tensor on the CPU whose rows sum to 1: one-hot
        rows for a hard route; softmax weights for a softmax route; for linear routes
        (signed, any scale) the absolute coefficients normalised per layer, which
        ``magnitude_shares`` says. Anisotropic coefficients (one per parameter tensor)
        are taken in absolute value, then averaged over tensors, so opposite signs do
        not cancel. Templates a route does not see (added after it was made) are 0.
    """
    route = model.routes[task]
    count = model.pool.num_templates
    if isinstance(route, HardRoute):
        matrix = torch.zeros(route.depth, count)
        matrix[torch.arange(route.depth), route.indices.cpu()] = 1.0
        return matrix
    weights = _coefficients(model, task).abs()
    if weights.ndim == 3:
        weights = weights.mean(-1)
    weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    padded = torch.zeros(weights.shape[0], count)
    padded[:, : weights.shape[1]] = weights
    return padded


def _coefficients(model: ModularNet, task: str) -> torch.Tensor:
    """A soft or hyper route's coefficients, float32 on the CPU."""
    return model.routes[task].plan(model.hypernet).coefficients.detach().float().cpu()


def magnitude_shares(model: ModularNet, task: str) -> bool:
    """Whether ``route_matrix`` shows a task's route as shares of absolute coefficients
    rather than as the coefficients themselves: some are negative, or a layer's (or
    a tensor's) do not sum to 1, as a linear route's or hypernetwork's may."""
    if isinstance(model.routes[task], HardRoute):
        return False
    coefficients = _coefficients(model, task)
    sums = coefficients.sum(1)
    return bool((coefficients < 0).any() or not torch.allclose(sums, torch.ones_like(sums)))


def route_kind(model: ModularNet, task: str) -> str:
    """How a task's route is parametrised, in words: ``"hard"``, ``"softmax"``,
    ``"linear"``, ``"hyper"``, with ``", anisotropic"`` for per-tensor coefficients."""
    spec = model.routes[task].spec()
    kind = spec.get("kind", "?")
    if kind == "soft":
        kind = spec.get("normalize", "soft")
        if len(spec.get("shape", ())) == 3 and spec["shape"][2] > 1:
            kind += ", anisotropic"
    elif kind == "hyper" and spec.get("num_tensors", 1) > 1:
        kind += ", anisotropic"
    return kind


def route_table(matrices: Mapping[str, torch.Tensor], magnitudes: Iterable[str] = ()) -> str:
    """A plain-text table per task: one row per layer, one column per template.

    Args:
        matrices: ``[layers, templates]`` shares per task (see ``route_matrix``).
        magnitudes: Tasks whose shares are of absolute coefficients
            (``magnitude_shares``): their heading says so and where the signed values are.
    """
    magnitudes = set(magnitudes)
    lines = []
    for task, matrix in matrices.items():
        count = matrix.shape[1]
        lines.append(f"task {task}")
        if task in magnitudes:
            lines.append(
                "(shares of |coefficient| per layer: the signed coefficients are "
                f"model.routes[{task!r}].plan(model.hypernet).coefficients)"
            )
        lines.append("layer  " + " ".join(f"T{k:<4d}" for k in range(count)) + "  top")
        for layer, row in enumerate(matrix.tolist()):
            top = max(range(count), key=row.__getitem__)
            lines.append(f"{layer:5d}  " + " ".join(f"{v:5.2f}" for v in row) + f"  T{top}")
        lines.append("")
    return "\n".join(lines)


def route_figure(
    matrices: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str] | str | None = None,
    title: str | None = None,
) -> Figure:
    """One heatmap per task side by side (in rows of up to 6), sharing one colour bar.

    Args:
        matrices: ``[layers, templates]`` shares per panel (see ``route_matrix``);
            the key is the panel's title, written in full.
        kinds: The route kind (``route_kind``): one for every panel, or per panel.
            One common kind goes into the figure title, differing kinds into the
            panel titles.
        title: Figure title (default: ``"Routes: template share per layer"``).

    Returns:
        A matplotlib ``Figure`` (save it with ``savefig``).
    """
    if not matrices:
        raise ValueError("no routes to draw: the model has no tasks")
    if isinstance(kinds, str) or kinds is None:
        kinds = {name: kinds for name in matrices} if kinds else {}
    common = set(kinds.values())
    shared_kind = common.pop() if len(common) == 1 and len(kinds) == len(matrices) else None
    layers = max(m.shape[0] for m in matrices.values())
    templates = max(m.shape[1] for m in matrices.values())
    count = len(matrices)
    rows = -(-count // MAX_COLUMNS)
    columns = -(-count // rows)
    panel_width = max(1.4, 0.32 * templates + 0.5)
    width = 1.2 + panel_width * columns
    height = 0.6 + rows * (0.9 + 0.26 * layers)
    figure = _new_figure(figsize=(width, height), dpi=110, layout="constrained")
    grid = figure.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    for unused in grid[count:]:
        unused.remove()
    axes = grid[:count]
    image = None
    for index, (ax, (name, matrix)) in enumerate(zip(axes, matrices.items(), strict=True)):
        image = ax.imshow(
            matrix.float().numpy(),
            cmap=COLORMAP,
            vmin=0.0,
            vmax=1.0,
            aspect="auto",
            interpolation="nearest",
        )
        label = name if shared_kind or not kinds.get(name) else f"{name}\n({kinds[name]})"
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(matrix.shape[1]))
        ax.tick_params(labelsize=7)
        if index + columns >= count:  # nothing below it
            ax.set_xlabel("template")
        if index % columns == 0:
            ax.set_ylabel("layer")
            ax.set_yticks(range(layers))
    title = title or "Routes: template share per layer"
    if shared_kind:
        title += f" ({shared_kind} route)"
    figure.suptitle(title, fontsize=10)
    bar = figure.colorbar(image, ax=list(axes), shrink=0.9 if rows == 1 else 0.6, pad=0.02)
    bar.set_label("share of the layer's weight", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return figure


def route_heatmap(
    matrices: Mapping[str, torch.Tensor],
    path: str | Path,
    kinds: Mapping[str, str] | str | None = None,
    title: str | None = None,
) -> Path:
    """Saves ``route_figure(matrices, kinds, title)`` as a PNG at ``path``; returns it."""
    return _save(route_figure(matrices, kinds, title), path)


def route_files(directory: str | Path, tasks: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Where ``save_route_figures`` writes: ``routes.png`` and ``routes.txt`` for every
    task, ``routes-<task>-<task>.png``/``.txt`` for the chosen ``tasks``, so that a
    figure of some tasks never replaces the run's figure of all of them."""
    directory = Path(directory)
    if not tasks:
        return directory / ROUTES_PNG, directory / ROUTES_TXT
    stem = "routes-" + "-".join(tasks)
    return directory / f"{stem}.png", directory / f"{stem}.txt"


def save_route_figures(
    model: ModularNet, directory: str | Path, tasks: Sequence[str] | None = None
) -> tuple[Path, Path]:
    """Writes the route heatmap (PNG) and table (text) into ``directory``.

    Args:
        model: The model.
        directory: Output folder (created if missing).
        tasks: Tasks to show (default: every task of the model); see ``route_files``
            for the file names.

    Returns:
        The paths of the PNG and the table.
    """
    png_path, txt = route_files(directory, tasks)
    tasks = list(tasks or model.task_names)
    matrices = {t: route_matrix(model, t) for t in tasks}
    png = route_heatmap(matrices, png_path, {t: route_kind(model, t) for t in tasks})
    atomic_write_text(txt, route_table(matrices, [t for t in tasks if magnitude_shares(model, t)]))
    return png, txt


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in order: those of the attempt of each
    phase whose weights the run holds.

    A record repeated by a resumed run (same phase, step and kind) keeps its last
    value. A phase started afresh (``{"phase": P, "event": "start"}``, written when
    ``transfer --overwrite`` retrains a task, or a phase interrupted before its
    first checkpoint runs again) begins a new attempt. An attempt replaces the
    earlier attempts of ``P`` once it has saved a checkpoint (``"event":
    "checkpoint"``, written after each one), so a retry stopped before its first
    checkpoint, whose weights the run never held, leaves the curves of the attempt
    the run still holds; while no attempt of ``P`` has saved one, the last attempt
    counts (files written before checkpoint records existed read as they did).
    ``modnet discard`` ends the attempt it drops (``"event": "discarded"``), so the
    attempt before it counts again. The event records themselves are not returned.
    A torn last line (a run killed mid-write) is skipped.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    records: dict[tuple, dict[str, Any]] = {}
    attempts: dict[Any, list[int]] = {}  # per phase: its attempts, the latest one last
    checkpointed: set[tuple] = set()  # (phase, attempt) of attempts that saved one
    started = 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        phase = record.get("phase")
        stack = attempts.setdefault(phase, [0])  # 0: records written before any start
        event = record.get("event")
        if event == START_EVENT:
            started += 1
            stack.append(started)
            continue
        if event == DISCARD_EVENT:
            if len(stack) > 1:
                stack.pop()
            continue
        if event == CHECKPOINT_EVENT:
            checkpointed.add((phase, stack[-1]))
            continue
        key = (phase, stack[-1], record.get("step"), "accuracy" in record)
        records.pop(key, None)
        records[key] = record
    held = {
        phase: next((a for a in reversed(stack) if (phase, a) in checkpointed), stack[-1])
        for phase, stack in attempts.items()
    }
    return [r for (phase, attempt, *_), r in records.items() if held[phase] == attempt]


def curves_figure(records: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Training loss, test accuracy per task and learning rate against the step.

    Phases (``train``, ``transfer-kmnist``, ...) follow each other on one step axis,
    each starting where the previous one ended, separated by a dotted line.

    Args:
        records: ``metrics.jsonl`` records (``read_metrics``): ``loss``/``lr``
            records and ``accuracy`` records (a dict task -> accuracy), each with
            ``phase`` and ``step``.
        title: Figure title (default: ``"Learning curves"``).

    Returns:
        A matplotlib ``Figure`` with three panels.

    Raises:
        ValueError: if there is no record to draw.
    """
    if not records:
        raise ValueError("no metrics to draw: the run has not logged a step yet")
    phases: list[str] = []
    for record in records:
        if record.get("phase") not in phases:
            phases.append(record.get("phase"))
    offsets, start = {}, 0
    for phase in phases:
        offsets[phase] = start
        start += max(r["step"] for r in records if r.get("phase") == phase)

    figure = _new_figure(figsize=(12, 3.6), dpi=110, layout="constrained")
    loss_ax, accuracy_ax, lr_ax = figure.subplots(1, 3, sharex=True)
    for phase in phases:
        for ax, key in ((loss_ax, "loss"), (lr_ax, "lr")):
            rows = [r for r in records if r.get("phase") == phase and key in r]
            ax.plot(
                [offsets[phase] + r["step"] for r in rows],
                [r[key] for r in rows],
                marker="o" if len(rows) < 20 else None,  # a short phase stays visible
                markersize=3,
                label=phase,
            )
    tasks: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for task, value in (record.get("accuracy") or {}).items():
            series = tasks.setdefault(task, ([], []))
            series[0].append(offsets[record.get("phase")] + record["step"])
            series[1].append(value)
    for task, (steps, values) in tasks.items():
        accuracy_ax.plot(steps, values, marker="o", markersize=4, label=task)
    for ax, name in ((loss_ax, "training loss"), (accuracy_ax, "test accuracy"), (lr_ax, "lr")):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for phase in phases[1:]:
            ax.axvline(offsets[phase], color="grey", linestyle=":", linewidth=1)
    losses = [r["loss"] for r in records if "loss" in r and r["loss"] > 0]
    if losses and max(losses) > 20 * min(losses):  # a log scale only when it spans decades
        loss_ax.set_yscale("log")
    accuracy_ax.set_ylim(0.0, 1.02)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if len(phases) > 1:
        loss_ax.legend(fontsize=7, title="phase", title_fontsize=7)
    if tasks:
        accuracy_ax.legend(fontsize=7, title="task", title_fontsize=7)
    figure.suptitle(title or "Learning curves", fontsize=11)
    return figure


def save_learning_curves(
    metrics: str | Path, path: str | Path | None = None, title: str | None = None
) -> Path:
    """Draws ``curves_figure`` from a ``metrics.jsonl`` file.

    Args:
        metrics: The ``metrics.jsonl`` file, or the run directory holding it.
        path: PNG to write (default: ``curves.png`` next to the metrics).
        title: Figure title.

    Returns:
        The path of the PNG.

    Raises:
        FileNotFoundError: if there is no metrics file.
        ValueError: if the file holds no record.
    """
    metrics = Path(metrics)
    if metrics.is_dir():
        metrics = metrics / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} at {metrics}: learning curves come from a run directory "
            "that `modnet train` wrote"
        )
    path = Path(path) if path is not None else metrics.parent / CURVES_PNG
    return _save(curves_figure(read_metrics(metrics), title), path)


def save_run_figures(
    model: ModularNet, run_dir: str | Path, out: str | Path | None = None, tasks=None
) -> list[Path]:
    """Every figure of a run: ``routes.png``, ``routes.txt`` and ``curves.png``.

    Args:
        model: The run's model.
        run_dir: The run directory (its ``metrics.jsonl`` gives the curves).
        out: Output folder (default: ``run_dir``).
        tasks: Tasks whose routes to draw (default: all).

    Returns:
        The files written; ``curves.png`` only when the run has metrics.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    written = list(save_route_figures(model, out, tasks))
    if (run_dir / METRICS_FILE).is_file():
        written.append(save_learning_curves(run_dir, out / CURVES_PNG))
    return written


def _new_figure(**options) -> Figure:
    from matplotlib.figure import Figure

    return Figure(**options)


def _save(figure: Figure, path: str | Path) -> Path:
    """Writes ``figure`` under a temporary name and renames it into place, so a crash
    mid-write keeps the figure that was there (the format follows the suffix)."""
    path = Path(path)
    atomic_write(path, figure.savefig)
    return path
