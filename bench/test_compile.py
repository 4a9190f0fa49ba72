"""``torch.compile`` vs eager for modnet (soft route, inference).

Compilation (inductor, about 30 s on a CPU) happens in the warm-up, outside the
timed rounds. Target: compiled not slower than eager.
"""

from __future__ import annotations

import timm
import torch
import torch._dynamo

from modnet.benchmark import Target, inference_workload, make_batch, place, training_workload

CLASSES = 10


def test_compiled_vs_eager(benchmark, interleave, record):
    benchmark.group = "compile"
    torch._dynamo.reset()
    cpu = torch.device("cpu")
    model = timm.create_model("modnet_conv_tiny", tasks={"t": CLASSES})
    model = place(model, cpu, torch.float32, channels_last=True)
    compiled = torch.compile(model, dynamic=False)
    x, _ = make_batch(model, 64, CLASSES, cpu, channels_last=True)
    timer = interleave(
        {
            "compiled": inference_workload(compiled, x, task="t"),
            "eager": inference_workload(model, x, task="t"),
        },
        rounds=8,
        min_time=0.05,
    )
    record(
        "inference throughput compiled/eager", timer.ratio("compiled", "eager"), Target(">=", 1.0)
    )


def test_compiled_vs_eager_mixed_task_training_step(benchmark, interleave, record):
    """A training step on a batch mixing 4 tasks: compiled runs it with fixed shapes
    (every layer once, per-sample weights), eager task by task."""
    benchmark.group = "compile"
    torch._dynamo.reset()
    cpu = torch.device("cpu")
    model = timm.create_model("modnet_conv_tiny", tasks={f"t{i}": CLASSES for i in range(4)})
    model = place(model, cpu, torch.float32, channels_last=True)
    compiled = torch.compile(model, dynamic=False)
    x, y = make_batch(model, 32, CLASSES, cpu, channels_last=True)
    ids = torch.arange(32) % 4
    timer = interleave(
        {
            "compiled": training_workload(compiled, x, y, task=ids),
            "eager": training_workload(model, x, y, task=ids),
        },
        rounds=4,
        min_time=0.05,
    )
    record("mixed-batch training step compiled/eager", timer.ratio("compiled", "eager"))
