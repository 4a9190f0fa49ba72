"""How an adapted route relates to the sources' routes: numbers and a heatmap.

Routes are compared as ``[layers, templates]`` shares (``modnet.plot.route_matrix``:
each layer's row sums to one). Per layer: cosine similarity and total-variation
distance (half the L1 distance: the share of weight that would have to move;
0 = same mixture, 1 = disjoint templates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..model import ModularNet
from ..plot import route_heatmap, route_matrix

AVERAGE_KEY = "average"
START_KEY = "start"


def compare(route: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """Per-layer cosine similarity and total-variation distance of two share matrices."""
    cosine = torch.nn.functional.cosine_similarity(route, reference, dim=1)
    tv = 0.5 * (route - reference).abs().sum(1)
    return {
        "cosine": round(float(cosine.mean()), 4),
        "tv": round(float(tv.mean()), 4),
        "cosine_per_layer": [round(float(v), 4) for v in cosine],
        "tv_per_layer": [round(float(v), 4) for v in tv],
    }


def route_relation(
    model: ModularNet,
    target: str,
    sources: Sequence[str],
    start: torch.Tensor | None = None,
) -> dict[str, Any]:
    """The target's route against each source's, their average and its own start.

    Args:
        model: The model holding the target and the sources.
        target: The adapted task.
        sources: Source task names.
        start: The target's route shares before adaptation, if known.

    Returns:
        JSON-able: ``to`` (per reference: mean and per-layer cosine and TV),
        ``nearest_source_per_layer``, ``top_template_per_layer`` (per task) and,
        with ``start``, ``moved`` (TV from the start per layer) and
        ``template_share_change`` (share each template gained, summed over layers).
    """
    matrices = {s: route_matrix(model, s) for s in sources}
    matrices[AVERAGE_KEY] = torch.stack([matrices[s] for s in sources]).mean(0)
    own = route_matrix(model, target)
    if start is not None:
        matrices[START_KEY] = start.float().cpu()
    relation: dict[str, Any] = {"to": {k: compare(own, m) for k, m in matrices.items()}}
    per_layer_tv = torch.stack([0.5 * (own - matrices[s]).abs().sum(1) for s in sources])
    relation["nearest_source_per_layer"] = [sources[int(i)] for i in per_layer_tv.argmin(0)]
    relation["top_template_per_layer"] = {
        task: [int(i) for i in matrix.argmax(1)]
        for task, matrix in {**{s: matrices[s] for s in sources}, target: own}.items()
    }
    if start is not None:
        change = (own - matrices[START_KEY]).sum(0)
        relation["moved"] = relation["to"][START_KEY]["tv_per_layer"]
        relation["template_share_change"] = [round(float(v), 4) for v in change]
    return relation


def relation_lines(relation: Mapping[str, Any], target: str) -> list[str]:
    """A few printable lines summarising ``route_relation``'s result."""
    lines = [f"route of {target} vs     cosine    TV (mean over layers)"]
    for name, values in relation["to"].items():
        lines.append(f"  {name:<20s} {values['cosine']:7.3f}  {values['tv']:6.3f}")
    nearest = relation["nearest_source_per_layer"]
    lines.append("  nearest source per layer: " + " ".join(nearest))
    if "template_share_change" in relation:
        change = relation["template_share_change"]
        order = sorted(range(len(change)), key=lambda k: -abs(change[k]))
        moves = ", ".join(f"T{k} {change[k]:+.2f}" for k in order[:3])
        lines.append(f"  share gained per template (summed over layers): {moves}")
    return lines


def save_relation_heatmap(
    model: ModularNet,
    target: str,
    sources: Sequence[str],
    path: str | Path,
    start: torch.Tensor | None = None,
) -> Path:
    """Heatmaps side by side: each source, their average, the target's start and its route."""
    matrices = {s: route_matrix(model, s) for s in sources}
    matrices[AVERAGE_KEY] = torch.stack(list(matrices.values())).mean(0)
    if start is not None:
        matrices[START_KEY] = start.float().cpu()
    matrices[target] = route_matrix(model, target)
    return route_heatmap(matrices, path)
