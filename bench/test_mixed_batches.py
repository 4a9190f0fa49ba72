"""A batch mixing T tasks vs a single-task batch of the same size (64), conv and ViT.

Three ways to run a mixed batch (``ModularNet.mixed_batches``): ``chunked`` (the
eager default, ``modnet.mixed``) runs layer by layer with the tasks a few at a
time, each chunk's weights mixed just before use, and a task with many samples
alone through all its layers; ``split`` runs each task's samples as one
sub-batch with its own mixed weights; ``grouped`` runs every layer once for the
whole batch with per-sample weights gathered by task id (fixed shapes: what runs
under ``torch.compile``). The model holds 64 tasks; only the first T appear in
the batch. Target: the default mixed batch at most 1.1x the time of a
single-task batch, i.e. a throughput ratio of at least 0.91, for T up to 64.
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
    split, grouped = copy.deepcopy(model), copy.deepcopy(model)
    split.mixed_batches, grouped.mixed_batches = "split", "grouped"
    x, _ = make_batch(model, BATCH, CLASSES, torch.device("cpu"))
    ids = torch.arange(BATCH) % tasks
    timer = interleave(
        {
            "default": inference_workload(model, x, task=ids),
            "split": inference_workload(split, x, task=ids),
            "grouped": inference_workload(grouped, x, task=ids),
            "single": inference_workload(model, x, task="t0"),
        },
        rounds=4,
        min_time=0.05,
        warmup=1,
    )
    record(f"{tasks}-task/1-task batch", timer.ratio("default", "single"), Target(">=", 0.91))
    for path in ("split", "grouped"):
        ratio = timer.ratio(path, "single")
        record(f"{tasks}-task/1-task batch, {path}", ratio, key=f"{path}_ratio")
