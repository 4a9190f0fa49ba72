"""Measures of how routes organise themselves: entropy, reuse and task similarity.

Used by ``multitask.py``; run on its own it prints the measures of a trained run:

    python experiments/route_analysis.py runs/digits
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modnet import io  # noqa: E402
from modnet.errors import ModnetError  # noqa: E402
from modnet.model import ModularNet  # noqa: E402
from modnet.plot import route_matrix  # noqa: E402


def layer_entropy(matrix: torch.Tensor) -> torch.Tensor:
    """Entropy (in bits) of each layer's template weights: 0 = one template, log2 K = uniform."""
    p = matrix.clamp_min(1e-12)
    return -(p * p.log2()).sum(1)


def route_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 minus the mean total-variation distance between two routes' layer distributions."""
    return 1.0 - 0.5 * float((a - b).abs().sum(1).mean())


def analyse_routes(model: ModularNet) -> dict:
    """Entropy per layer, the templates each task prefers, and task-task route similarity."""
    tasks = model.task_names
    matrices = {t: route_matrix(model, t) for t in tasks}
    count = model.pool.num_templates
    entropy = torch.stack([layer_entropy(m) for m in matrices.values()]).mean(0)
    usage = {t: m.argmax(1).tolist() for t, m in matrices.items()}
    share = {t: (m.sum(0) / m.sum()).tolist() for t, m in matrices.items()}
    similarity = [[route_similarity(matrices[a], matrices[b]) for b in tasks] for a in tasks]
    return dict(
        tasks=tasks,
        max_entropy_bits=math.log2(count),
        entropy_per_layer=entropy.tolist(),
        top_template_per_layer=usage,
        template_share=share,
        similarity=similarity,
    )


def analysis_markdown(analysis: dict) -> str:
    tasks = analysis["tasks"]
    lines = [
        "Route entropy per layer (bits, mean over tasks; "
        f"uniform = {analysis['max_entropy_bits']:.2f}):",
        "",
    ]
    lines.append(" ".join(f"L{i}:{e:.2f}" for i, e in enumerate(analysis["entropy_per_layer"])))
    lines += ["", "Template with the largest weight at each layer:", ""]
    for task in tasks:
        lines.append(f"- {task}: " + " ".join(map(str, analysis["top_template_per_layer"][task])))
    lines += ["", "Route similarity between tasks (1 - mean total-variation distance):", ""]
    lines.append("| | " + " | ".join(tasks) + " |")
    lines.append("|" + "---|" * (len(tasks) + 1))
    for task, row in zip(tasks, analysis["similarity"], strict=True):
        lines.append(f"| {task} | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the route measures of a run or model directory's tasks (markdown)."""
    p = argparse.ArgumentParser(
        description="Print route entropy per layer, each task's top templates and the "
        "route similarity between tasks, for a trained run or model directory.",
        allow_abbrev=False,
    )
    p.add_argument("run_dir", help="run or model directory")
    args = p.parse_args(argv)
    try:
        model, _ = io.load_model(args.run_dir)
    except ModnetError as error:
        p.exit(2, f"{p.prog}: error: {error}\n")
    print(analysis_markdown(analyse_routes(model)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
