"""bf16 autocast vs fp32 on this CPU, per family: training step and inference.

Each family's ``default_precision`` (what ``TrainConfig(precision="auto")`` trains
in) is the faster side here. CPUs without bf16 instructions (no AVX512-BF16 or
AMX) emulate bf16 convolutions and matmuls, so fp32 usually wins there.
No target: the figure decides the default.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from modnet.benchmark import (
    Precision,
    Target,
    Workload,
    inference_workload,
    make_batch,
    matmul_workload,
    training_workload,
)

CLASSES = 10
BATCH = 32


@pytest.mark.parametrize("step", ["inference", "training"])
@pytest.mark.parametrize("family", ["conv", "vit"])
def test_bf16_vs_fp32(benchmark, interleave, record, family, step):
    benchmark.group = "precision"
    model = timm.create_model(f"modnet_{family}_tiny", tasks={"t": CLASSES})
    x, y = make_batch(model, BATCH, CLASSES, torch.device("cpu"))
    bf16 = Precision.parse("amp_bfloat16")
    if step == "inference":
        sides = {
            "bf16": inference_workload(model, x, task="t", precision=bf16),
            "fp32": inference_workload(model, x, task="t"),
        }
    else:
        sides = {
            "bf16": training_workload(model, x, y, task="t", precision=bf16),
            "fp32": training_workload(model, x, y, task="t"),
        }
    timer = interleave(sides, rounds=4, min_time=0.05, warmup=1)
    record(
        f"{step} throughput bf16/fp32 ({model.default_precision} default)",
        timer.ratio("bf16", "fp32"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_matmul_reference_runs_at_a_linear_layers_rate(benchmark, interleave, record, dtype):
    """Every ``flops_utilization`` divides by ``matmul_workload``'s FLOP/s; it must be the
    rate the models' own ``nn.Linear`` matmuls reach in the same dtype, or shares of it
    mean nothing (``torch.mm`` in bf16 ran 30x slower than a bf16 linear here)."""
    benchmark.group = "precision"
    size = 1024
    reference, _ = matmul_workload(torch.device("cpu"), dtype, size)
    layer = nn.Linear(size, size).to(dtype)
    x = torch.randn(size, size).to(dtype)
    sides = {"reference": reference, "linear": Workload(lambda: layer(x), 1, torch.device("cpu"))}
    timer = interleave(sides, rounds=4, min_time=0.05, warmup=1)
    record(
        "matmul reference / nn.Linear FLOP/s",
        timer.ratio("reference", "linear"),  # the same FLOPs on both sides
        Target(">=", 0.8),
    )
