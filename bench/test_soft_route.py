"""Soft route vs the same network with its route baked in (``ExportedNet``).

A soft route mixes K templates into every layer's weights once per forward, then
runs one block per layer; the exported network runs the same blocks with the
mixed weights stored. The gap is the cost of mixing: L*K*P multiply-adds per
forward, whatever the batch size. Conv family (modnet_conv_tiny: 16 inverted
residuals at 16x16x40), channels_last for both sides. BatchNorm folding is
off on the soft side, so both run the same blocks' arithmetic and the ratio is
the cost of routing alone (``test_batchnorm_folding.py`` measures the folding).
Target: at least 0.97 at batch 64.
"""

from __future__ import annotations

import pytest
import timm
import torch

from modnet.benchmark import Target, inference_workload, make_batch, place

CLASSES = 10


@pytest.mark.parametrize("templates", [2, 4, 8, 16], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("batch", [1, 8, 64], ids=lambda b: f"b{b}")
def test_soft_route_vs_baked_in(benchmark, interleave, record, batch, templates):
    benchmark.group = "soft-vs-baked"
    model = timm.create_model("modnet_conv_tiny", tasks={"t": CLASSES}, num_templates=templates)
    cpu = torch.device("cpu")
    model = place(model, cpu, torch.float32, channels_last=True).set_batchnorm_folding(False)
    baked = place(model.export("t"), cpu, torch.float32, channels_last=True)
    x, _ = make_batch(model, batch, CLASSES, cpu, channels_last=True)
    timer = interleave(
        {"soft": inference_workload(model, x, task="t"), "baked": inference_workload(baked, x)},
        rounds=24 if batch == 64 else 10,
        min_time=0.05,
    )
    target = Target(">=", 0.97) if batch == 64 else None
    record("inference throughput soft/baked-in", timer.ratio("soft", "baked"), target)
