"""The library's default paths against a plain reference at the same batch size.

Reference: ``plain_twin`` of the model (for the conv family a plain
``nn.Sequential`` of timm ``InvertedResidual`` blocks between the same stem and
head; for ViT timm's ``VisionTransformer``) in NCHW (its copy of the conv
trunk set not to convert inputs to channels_last), run as one batch.

- Inference of 256 images: ``modnet.train.evaluate.predict`` with its defaults
  (the family's micro-batch, inputs in the layout of the model's weights) on a
  model as ``timm.create_model`` builds it. Target for the conv family: >= 4x.
- Training step at batch 64: one step of ``modnet.train.Trainer`` with the
  default ``TrainConfig`` (AdamW, gradient clipping, the batch indexed from
  in-memory data), against the same optimizer, loss and clipping on the
  reference. Target for the conv family: >= 1.5x.

Both record achieved FLOP/s as a share of a dense 2048x2048 matmul timed in
the same rounds, per family.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from modnet.benchmark import (
    Target,
    Workload,
    count_flops,
    matmul_workload,
    plain_twin,
    set_memory_format,
)
from modnet.data import load_task
from modnet.train import TrainConfig, Trainer
from modnet.train.distributed import DistContext
from modnet.train.evaluate import default_micro_batch, predict

CLASSES = 4
FAMILIES = {"conv": "modnet_conv_tiny", "vit": "modnet_vit_tiny"}
INFERENCE_TARGET = {"conv": Target(">=", 4.0)}
TRAINING_TARGET = {"conv": Target(">=", 1.5)}
CPU = torch.device("cpu")


def _reference(model, task: str) -> torch.nn.Module:
    """The plain twin, kept in NCHW: its trunk (a copy) no longer converts the input."""
    return set_memory_format(plain_twin(model, task), torch.contiguous_format)


def _images(model, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *model.pretrained_cfg["input_size"], generator=generator)


def _utilization(record, timer, flops, side: str, detail: str) -> None:
    achieved = flops[side] / timer.step_time(side)
    peak = flops["matmul"] / timer.step_time("matmul")
    record(
        f"{side} FLOP/s / matmul FLOP/s",
        timer.ratio(side, "matmul", work=flops),
        detail=f"{detail}{side}: {achieved / 1e9:.2f} GFLOP/s, matmul {peak / 1e9:.1f} GFLOP/s",
        key=f"{side}_utilization",
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_inference_of_256_images_vs_plain_nchw(benchmark, interleave, record, family):
    benchmark.group = "defaults"
    model = timm.create_model(FAMILIES[family], tasks={"t": CLASSES})
    plain = _reference(model, "t").eval()
    x = _images(model, 256)

    def reference() -> torch.Tensor:
        with torch.inference_mode():
            return plain(x)

    sides = {
        "default": Workload(lambda: predict(model, x, "t"), 256, CPU),
        "reference": Workload(reference, 256, CPU),
    }
    flops = {side: count_flops(workload) for side, workload in sides.items()}
    sides["matmul"], flops["matmul"] = matmul_workload(CPU)
    timer = interleave(sides, rounds=4, min_time=0.05, warmup=1)
    micro = default_micro_batch(model)
    record(
        "inference of 256: default / plain NCHW",
        timer.ratio("default", "reference"),
        INFERENCE_TARGET.get(family),
        detail=f"default micro-batch {micro}",
    )
    for side in ("default", "reference"):
        _utilization(record, timer, flops, side, f"inference {family}, ")


def _trainer(family: str, tmp_path) -> Trainer:
    config = TrainConfig(model=FAMILIES[family], tasks=["synth_shape"], progress=False)
    model = timm.create_model(config.model, **config.model_kwargs)
    channels, size, _ = model.pretrained_cfg["input_size"]
    task = load_task("synth_shape", img_size=size, in_chans=channels, train_limit=512)
    model.add_task("synth_shape", task.num_classes)
    return Trainer(model, {"synth_shape": task}, config, tmp_path, "bench", DistContext(), {})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_training_step_at_batch_64_vs_plain_nchw(
    benchmark, interleave, record, family, tmp_path
):
    benchmark.group = "defaults"
    trainer = _trainer(family, tmp_path)
    config = trainer.config
    assert config.batch_size == 64
    plain = _reference(trainer.model, "synth_shape").train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=config.lr)
    x, y, _ = trainer.batch(0)
    x, y = x.contiguous(), y.clone()
    steps = {"default": 0}

    def default_step() -> None:
        trainer._train_step(steps["default"] % trainer.total_steps)
        steps["default"] += 1

    def reference_step() -> None:
        loss = F.cross_entropy(plain(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(plain.parameters()), config.grad_clip)
        optimizer.step()

    sides = {
        "default": Workload(default_step, config.batch_size, CPU),
        "reference": Workload(reference_step, config.batch_size, CPU),
    }
    flops = {side: count_flops(workload) for side, workload in sides.items()}
    sides["matmul"], flops["matmul"] = matmul_workload(CPU)
    timer = interleave(sides, rounds=4, min_time=0.05, warmup=1)
    record(
        "training step at 64: default / plain NCHW",
        timer.ratio("default", "reference"),
        TRAINING_TARGET.get(family),
    )
    for side in ("default", "reference"):
        _utilization(record, timer, flops, side, f"training {family}, ")
