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

from modnet.benchmark import Target, Workload, inference_workload, make_batch

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


# The widest linear layer of each tiny model, for one sample: rows (tokens or
# pixels) x inputs -> outputs. ViT: fc1 over 65 tokens; conv: the 1x1 expansion
# over the 16 x 16 feature map.
LAYERS = {"vit": (65, 192, 768), "conv": (256, 40, 240)}


@pytest.mark.parametrize("family", ["conv", "vit"])
def test_per_task_matmul_bound(benchmark, interleave, record, family):
    """What the kernels allow a batch of 64 tasks, one sample each, in one layer.

    ``shared``: one matmul over the batch's rows with one weight (a single-task
    batch); ``per_task``: one batched matmul with every sample's own weight, already
    mixed; ``mix_and_per_task``: the chunked default's work, 16 tasks' weights mixed
    from ``K = 4`` templates just before their matmul. The first ratio bounds the
    default mixed batch from above whatever the surrounding code does: the same
    FLOPs, run as 64 small matmuls instead of one large one.
    """
    benchmark.group = "mixed-batches"
    rows, width, out = LAYERS[family]
    tasks, templates, chunk = 64, 4, 16
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tasks, rows, width, generator=generator)
    bank = torch.randn(templates, width * out, generator=generator)
    coefficients = torch.rand(tasks, templates, generator=generator)
    shared = bank[0].view(width, out)
    mixed = (coefficients @ bank).view(tasks, width, out)

    def mix_and_per_task() -> list[torch.Tensor]:
        return [
            torch.bmm(x[s : s + chunk], (coefficients[s : s + chunk] @ bank).view(-1, width, out))
            for s in range(0, tasks, chunk)
        ]

    def workload(step) -> Workload:
        return Workload(step, tasks, torch.device("cpu"))

    timer = interleave(
        {
            "shared": workload(lambda: x.view(-1, width) @ shared),
            "per_task": workload(lambda: torch.bmm(x, mixed)),
            "mix_and_per_task": workload(mix_and_per_task),
        },
        rounds=8,
        min_time=0.05,
    )
    record("per-task/shared matmul", timer.ratio("per_task", "shared"), key="per_task_ratio")
    record("mixed+per-task/shared matmul", timer.ratio("mix_and_per_task", "shared"))
