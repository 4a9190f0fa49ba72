"""A batch mixing T tasks vs a single-task batch of the same size (64), conv and ViT.

Two ways to run a mixed batch (``ModularNet.mixed_batches``): ``split`` runs each
task's samples as one sub-batch with its own mixed weights (the eager default);
``grouped`` runs every layer once for the whole batch with per-sample weights
gathered by task id (fixed shapes: what runs under ``torch.compile``). The model
holds 64 tasks; only the first T appear in the batch.
Target: the default (split) mixed batch at most 1.1x the time of a single-task
batch, i.e. a throughput ratio of at least 0.91, for T up to 64.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from modnet.benchmark import Target, inference_workload, make_batch

CLASSES = 10
BATCH = 64


@pytest.mark.parametrize("tasks", [4, 64], ids=lambda n: f"T{n}")
@pytest.mark.parametrize("family", ["conv", "vit"])
def test_mixed_batch_vs_single_task(benchmark, interleave, record, family, tasks):
    benchmark.group = "mixed-batches"
    model = timm.create_model(f"modnet_{family}_tiny", tasks={f"t{i}": CLASSES for i in range(64)})
    grouped = copy.deepcopy(model)
    model.mixed_batches, grouped.mixed_batches = "split", "grouped"
    x, _ = make_batch(model, BATCH, CLASSES, torch.device("cpu"))
    ids = torch.arange(BATCH) % tasks
    timer = interleave(
        {
            "split": inference_workload(model, x, task=ids),
            "grouped": inference_workload(grouped, x, task=ids),
            "single": inference_workload(model, x, task="t0"),
        },
        rounds=4,
        min_time=0.05,
        warmup=1,
    )
    record(f"{tasks}-task/1-task batch, split", timer.ratio("split", "single"), Target(">=", 0.91))
    record(
        f"{tasks}-task/1-task batch, grouped",
        timer.ratio("grouped", "single"),
        key="grouped_ratio",
    )
