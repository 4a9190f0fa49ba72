"""channels_last vs NCHW execution of the conv family (``ConvTrunk.memory_format``).

The same model runs both sides; only the layout its trunk converts images to
differs (every convolution after the stem follows its input's layout). The conv
family's default layout is the faster one here. Target: channels_last at least
as fast as NCHW for inference and for a training step at batch 64.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from modnet.benchmark import (
    Target,
    inference_workload,
    make_batch,
    set_memory_format,
    training_workload,
)

CLASSES = 10
BATCH = 64


def layouts() -> dict[str, torch.nn.Module]:
    model = timm.create_model("modnet_conv_tiny", tasks={"t": CLASSES})
    nchw = copy.deepcopy(model)
    set_memory_format(model, torch.channels_last)
    set_memory_format(nchw, torch.contiguous_format)
    return {"channels_last": model, "nchw": nchw}


@pytest.mark.parametrize("step", ["inference", "training"])
def test_channels_last_vs_nchw(benchmark, interleave, record, step):
    benchmark.group = "channels-last"
    models = layouts()
    x, y = make_batch(models["nchw"], BATCH, CLASSES, torch.device("cpu"))
    if step == "inference":
        sides = {name: inference_workload(m, x, task="t") for name, m in models.items()}
    else:
        sides = {name: training_workload(m, x, y, task="t") for name, m in models.items()}
    timer = interleave(sides, rounds=6, min_time=0.05)
    ratio = timer.ratio("channels_last", "nchw")
    record(f"{step} throughput channels_last/NCHW", ratio, Target(">=", 1.0))
