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

from modnet.benchmark import Precision, inference_workload, make_batch, training_workload

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
