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
from collections.abc import Callable

import pytest
import timm
import torch

from modnet import mixed
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
    ratio = timer.ratio("default", "single")
    record(f"throughput {tasks}-task/1-task batch", ratio, Target(">=", 0.91))
    for path in ("split", "grouped"):
        ratio = timer.ratio(path, "single")
        record(f"throughput {tasks}-task/1-task, {path}", ratio, key=f"{path}_ratio")


@pytest.mark.parametrize("family", ["conv", "vit"])
def test_hard_routes_mixed_batch_vs_single_task(benchmark, interleave, record, family):
    """64 tasks on random hard routes, one sample each: tasks whose routes pick the
    same template at a layer run it as one batch (``modnet.mixed.weight_sets``),
    about 16 samples a template; the conv family's BatchNorm then runs unfolded,
    with each sample's task statistics."""
    benchmark.group = "mixed-batches"
    tasks = {f"t{i}": CLASSES for i in range(64)}
    model = timm.create_model(f"modnet_{family}_tiny", tasks=tasks, route="hard")
    generator = torch.Generator().manual_seed(0)
    for name in tasks:  # the default hard route is the same for every task
        route = torch.randint(model.pool.num_templates, (model.depth,), generator=generator)
        model.set_route(name, route)
    x, _ = make_batch(model, BATCH, CLASSES, torch.device("cpu"))
    timer = interleave(
        {
            "default": inference_workload(model, x, task=torch.arange(BATCH)),
            "single": inference_workload(model, x, task="t0"),
        },
        rounds=4,
        min_time=0.05,
        warmup=1,
    )
    ratio = timer.ratio("default", "single")
    record("throughput 64-task/1-task, hard routes", ratio, Target(">=", 0.91))


@pytest.mark.parametrize("family", ["conv", "vit"])
def test_per_task_block_bound(benchmark, interleave, record, family):
    """What the kernels allow a batch of 64 tasks, one sample each, in one block.

    ``single``: the first block for the batch of 64 with one task's weights (what a
    single-task batch runs); ``per_task``: the same block with every sample's own
    weights, already mixed, in the default's chunks of 16 tasks
    (``TemplatePool.run_grouped``: one small matmul or convolution per sample).
    Neither mixes weights, so the ratio bounds what the routed layers of a mixed
    batch can reach with these kernels: the same FLOPs, run as per-sample kernels.
    (The whole model's ratio can come out a little higher: its trunk and heads run
    at full batch on both sides.) ``mixed`` adds each chunk's mix as the default
    path mixes (``modnet.mixed.chunk_weights``: without autograd, linear layers mix
    in place); ``mixed_up_front`` mixes the chunk's every weight before the block,
    as the default did before, and as it still does with autograd or folding.
    """
    benchmark.group = "mixed-batches"
    names = [f"t{i}" for i in range(64)]
    model = timm.create_model(f"modnet_{family}_tiny", tasks=dict.fromkeys(names, CLASSES)).eval()
    pool, chunk = model.pool, mixed.CHUNK_SAMPLES
    x, _ = make_batch(model, BATCH, CLASSES, torch.device("cpu"))
    coefficients, _ = mixed.task_coefficients(model, names)
    with torch.inference_mode():
        h = model._trunk_stage("embed", x, model.norm_stats["t0"])
        coefficients = coefficients[:, 0]  # [T, K, num_tensors] of the first layer
        weights = pool.mix(coefficients)
    stats = {
        name: torch.stack([model.norm_stats[t].layer_stack(name)[0] for t in names])
        for name in pool.stat_names
    }
    ids, ones = torch.arange(chunk), torch.ones(chunk)

    def rows(tensors: dict[str, torch.Tensor], start: int) -> dict[str, torch.Tensor]:
        return {name: t[start : start + chunk] for name, t in tensors.items()}

    def single() -> torch.Tensor:
        with torch.inference_mode():
            first = {name: t[0] for name, t in weights.items()}
            return pool.run(h, first, {name: t[0] for name, t in stats.items()})

    def per_task(mix: str) -> Callable[[], list[torch.Tensor]]:
        def step() -> list[torch.Tensor]:
            with torch.inference_mode():
                outputs = []
                for s in range(0, BATCH, chunk):
                    if mix == "default":
                        tensors, in_place = mixed.chunk_weights(pool, coefficients[s : s + chunk])
                    elif mix == "up_front":
                        tensors, in_place = pool.mix(coefficients[s : s + chunk]), None
                    else:
                        tensors, in_place = rows(weights, s), None
                    part = h[s : s + chunk]
                    outputs.append(
                        pool.run_grouped(part, tensors, rows(stats, s), ids, ones, 1, in_place)
                    )
                return outputs

        return step

    def workload(step) -> Workload:
        return Workload(step, BATCH, torch.device("cpu"))

    timer = interleave(
        {
            "single": workload(single),
            "per_task": workload(per_task(mix="none")),
            "mixed": workload(per_task(mix="default")),
            "mixed_up_front": workload(per_task(mix="up_front")),
        },
        rounds=8,
        min_time=0.05,
    )
    ratio = timer.ratio("per_task", "single")
    record("throughput per-task/one-weight block", ratio, key="per_task_ratio")
    record("throughput mixed/one-weight block", timer.ratio("mixed", "single"))
    ratio = timer.ratio("mixed", "mixed_up_front")
    record("throughput default mix/mix up front", ratio, key="in_place_ratio")
