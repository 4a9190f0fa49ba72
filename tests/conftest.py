"""Tiny models shared by the tests: small enough that every test runs in seconds."""

from __future__ import annotations

import os

import pytest
import timm
import torch

import modnet
from modnet.train import TrainConfig


def _share_the_cores_between_workers() -> None:
    """Gives each pytest-xdist worker its share of the cores, in-process and for subprocesses.

    Without it every worker runs torch's default thread count, and two workers on
    two cores oversubscribe them (2-4x slower steps).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores_between_workers()

TINY_CONV = dict(width=8, exp_ratio=2.0, img_size=8, num_templates=3, depth=4)
TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, num_templates=3, depth=4)


def tiny_conv(**overrides) -> modnet.ModularNet:
    return timm.create_model("modnet_conv_tiny", **{**TINY_CONV, **overrides})


def tiny_vit(**overrides) -> modnet.ModularNet:
    return timm.create_model("modnet_vit_tiny", **{**TINY_VIT, **overrides})


def images(model: modnet.ModularNet, batch: int = 4, seed: int = 0) -> torch.Tensor:
    channels, height, width = model.pretrained_cfg["input_size"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def moved_off_init(model: modnet.ModularNet, scale: float = 0.2) -> modnet.ModularNet:
    """Perturbs the templates as training would.

    Conv templates start with their last BatchNorm at zero (every block is the
    identity), which makes route gradients exactly zero at step 0.
    """
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.pool.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model


def tiny_train_config(model_kwargs: dict, **overrides) -> TrainConfig:
    """A training config that runs in seconds: small data, quiet, fast learning rates."""
    values = dict(
        model="modnet_conv_tiny",
        model_kwargs=model_kwargs,
        batch_size=32,
        lr=1e-2,
        route_lr=5e-2,
        progress=False,
    )
    values.update(overrides)
    return TrainConfig(**values)
