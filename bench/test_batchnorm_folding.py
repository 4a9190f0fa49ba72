"""Inference with each block's BatchNorms folded into their convolutions (the default).

The same model runs both sides; the baseline has folding turned off
(``ModularNet.set_batchnorm_folding(False)``), so every BatchNorm makes its own
pass over the activations. Target: folded at least as fast as unfolded at every
batch size, batch 1 included, where the fold's own cost (done once per forward
for every layer) weighs most.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from modnet.benchmark import Target, inference_workload, make_batch

CLASSES = 10


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_folded_vs_unfolded_inference(benchmark, interleave, record, batch):
    benchmark.group = "batchnorm-folding"
    folded = timm.create_model("modnet_conv_tiny", tasks={"t": CLASSES})
    unfolded = copy.deepcopy(folded).set_batchnorm_folding(False)
    x, _ = make_batch(folded, batch, CLASSES, torch.device("cpu"))
    sides = {
        "folded": inference_workload(folded, x, task="t"),
        "unfolded": inference_workload(unfolded, x, task="t"),
    }
    timer = interleave(sides, rounds=6, min_time=0.05)
    ratio = timer.ratio("folded", "unfolded")
    record(f"inference b{batch} folded/unfolded", ratio, Target(">=", 1.0))
