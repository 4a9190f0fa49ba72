"""The target's accuracy as adaptation proceeds, one line per method (matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..plot import _new_figure, _save


def accuracy_curves_figure(
    panels: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    references: Mapping[str, float] | None = None,
    title: str | None = None,
):
    """Target accuracy against the adaptation step, one panel per group of methods.

    Args:
        panels: Panel title -> method -> curve, a list of ``{"step", "accuracy"}``
            points (``AdaptResult.curve``).
        references: Horizontal lines drawn on every panel (e.g. the source-only
            start and an upper bound trained with labels), label -> accuracy.
        title: Figure title.

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ValueError: No panel holds a point.
    """
    if not any(any(curve for curve in methods.values()) for methods in panels.values()):
        raise ValueError("no accuracy curve to draw: adapt with curve_every > 0")
    count = len(panels)
    figure = _new_figure(figsize=(1.0 + 4.6 * count, 3.8), dpi=110, layout="constrained")
    axes = figure.subplots(1, count, sharey=True, squeeze=False).ravel()
    styles = ["--", ":", "-."]
    for ax, (name, methods) in zip(axes, panels.items(), strict=True):
        for method, curve in methods.items():
            if curve:
                ax.plot(
                    [p["step"] for p in curve],
                    [100 * p["accuracy"] for p in curve],
                    marker="o" if len(curve) < 15 else None,
                    markersize=3,
                    label=method,
                )
        for index, (label, value) in enumerate((references or {}).items()):
            ax.axhline(
                100 * value,
                color="grey",
                linestyle=styles[index % len(styles)],
                linewidth=1,
                label=label,
            )
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("adaptation step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("target test accuracy (%)")
    figure.suptitle(title or "Target accuracy during adaptation", fontsize=11)
    return figure


def save_accuracy_curves(
    panels: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]],
    path: str | Path,
    references: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Saves ``accuracy_curves_figure(panels, references, title)`` as a PNG; returns its path."""
    return _save(accuracy_curves_figure(panels, references, title), path)
