"""Weight mixing (modnet) vs output mixing (the naive mixture of experts) at equal K.

Output mixing runs all K templates at every layer and mixes their outputs; modnet
mixes the weights and runs one block. Both use the model's own pool, trunk and
soft-route coefficients (see ``modnet.benchmark.OutputMixingNet``), with
BatchNorm folding off: the ratio is that of the two mixing strategies alone.
Target: weight mixing at least 3.5 times faster at K = 4.
"""

from __future__ import annotations

import pytest
import timm
import torch

from modnet.benchmark import OutputMixingNet, Target, inference_workload, make_batch, place

CLASSES = 10


@pytest.mark.parametrize("templates", [2, 4, 8], ids=lambda k: f"K{k}")
def test_weight_mixing_vs_output_mixing(benchmark, interleave, record, templates):
    benchmark.group = "mixing"
    model = timm.create_model("modnet_conv_tiny", tasks={"t": CLASSES}, num_templates=templates)
    cpu = torch.device("cpu")
    model = place(model, cpu, torch.float32, channels_last=True).set_batchnorm_folding(False)
    x, _ = make_batch(model, 32, CLASSES, cpu, channels_last=True)
    timer = interleave(
        {
            "weights": inference_workload(model, x, task="t"),
            "outputs": inference_workload(OutputMixingNet(model, "t"), x),
        },
        rounds=6,
        min_time=0.05,
    )
    target = Target(">=", 3.5) if templates == 4 else None
    record("speed-up weight/output mixing", timer.ratio("weights", "outputs"), target)
