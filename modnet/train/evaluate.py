"""Inference and accuracy, in micro-batches that fit the CPU caches.

A forward pass over a large batch is memory-bound on a CPU: the expanded
activations of 256 images (240 channels at 16x16 for ``modnet_conv_tiny``)
do not fit in the caches, and every layer streams them from main memory.
``predict`` therefore runs any batch as consecutive micro-batches; the logits
are the same (eval mode has no batch statistics) and only the speed changes.
Inference also runs the conv family's BatchNorms folded into their
convolutions (``modnet.folding``), which saves a pass over the activations each.

Default micro-batch per family, measured with one thread on 256 images
(``modnet_conv_tiny`` at 32x32 and ``modnet_vit_tiny``, interleaved rounds):
with NCHW weights the conv family runs 4.5x faster in micro-batches of 32 than
as one batch of 256 (64: 2.2x, 16: 3.7x, 8: 3.8x); with channels_last weights,
16 is best (4.3x the plain NCHW twin at 256, against 3.8x at 32 and 2.2x at 64),
so the conv family takes 16. With BatchNorm folding, 8, 16 and 32 are within
noise of each other (1.43, 1.54 and 1.52 s per 256 images, against 1.80 s at
64 and 2.21 s as one batch), so 16 stays. The ViT family gains little (1.15x
at 32, within noise from 16 to 256) and takes 32. ``bench/test_defaults.py`` holds the ratio
of the default path against the plain reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import TaskData, eval_batches
from ..data.loader import shard_starts
from ..errors import ConfigError
from .config import _choice

INFERENCE_PRECISIONS = ("fp32", "bf16")  # "auto" is resolved by the caller
MICRO_BATCH = {"conv": 16, "vit": 32}
DEFAULT_MICRO_BATCH = 32


def default_micro_batch(model: nn.Module) -> int:
    """The measured micro-batch of the model's family (32 for unmeasured ones)."""
    config = getattr(model, "config", None)
    family = config.get("family") if isinstance(config, Mapping) else None
    return MICRO_BATCH.get(family, DEFAULT_MICRO_BATCH)


def input_format(model: nn.Module) -> torch.memory_format:
    """The layout the model's convolution weights are in: its inputs should match.

    ``torch.channels_last`` when the first spatial (k > 1) 4-D weight is NHWC
    (the model was moved with ``memory_format=torch.channels_last``), else
    ``torch.contiguous_format``.
    """
    for parameter in model.parameters():
        if parameter.dim() == 4 and parameter.shape[-1] > 1:
            if parameter.is_contiguous():
                return torch.contiguous_format
            if parameter.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
            break
    return torch.contiguous_format


@torch.inference_mode()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    task: Any = None,
    micro_batch: int | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits of a batch, computed ``micro_batch`` images at a time in eval mode.

    Args:
        model: The network (its training mode is restored afterwards).
        x: Model input, float [B, C, H, W], on the model's device (cast to the
            dtype of its weights for fp32 precision: a half or double model).
        task: Passed as ``model(x, task=task)`` when given.
        micro_batch: Images per forward pass; default ``default_micro_batch(model)``.
        precision: ``"fp32"``, or ``"bf16"`` for bfloat16 autocast.

    Returns:
        Logits [B, num_classes]; equal to ``model(x, task=task)`` in eval mode
        up to float summation order.

    Raises:
        ConfigError: ``precision`` is neither ``"fp32"`` nor ``"bf16"``.
        ValueError: ``micro_batch`` is not a positive integer.
    """
    _choice("precision", precision, INFERENCE_PRECISIONS)
    size = default_micro_batch(model) if micro_batch is None else micro_batch
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    was_training = model.training
    model.eval()
    layout = input_format(model)
    # a model converted to half, bf16 or double (io.load_model keeps the saved dtype)
    # takes its inputs in that dtype; autocast (bf16) casts them itself
    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    cast = weights if precision == "fp32" and x.is_floating_point() else None
    outputs = []
    with torch.autocast(x.device.type, torch.bfloat16, enabled=precision == "bf16"):
        for chunk in x.split(size):
            chunk = chunk.contiguous(memory_format=layout)
            chunk = chunk if cast is None else chunk.to(cast)
            outputs.append(model(chunk) if task is None else model(chunk, task=task))
    model.train(was_training)
    return torch.cat(outputs)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data: Mapping[str, TaskData],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    micro_batch: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Top-1 accuracy on each task's test split, in eval mode (the mode is restored).

    Args:
        model: A modnet model holding every task in ``data``.
        data: Task name to its data; test splits on disk are read by a
            DataLoader with ``workers`` processes.
        batch_size: Images read and normalised at a time.
        device: Where the model is.
        precision: ``"fp32"`` or ``"bf16"``.
        micro_batch: Images per forward pass (see ``predict``).
        workers: Loader processes for test splits on disk.
        progress: Show a progress bar per task (images scored; cleared when done):
            scoring a full test split on a CPU takes minutes.
        shard: ``(rank, world_size)`` of a data-parallel run: every rank scores its
            share of the batches (``eval_batches``) and the counts are summed over
            the default process group, so every rank returns the whole split's
            accuracy. Every rank must call this together, in a process group of
            ``world_size`` ranks.

    Returns:
        Task name to its accuracy in [0, 1].

    Raises:
        ConfigError: ``precision`` is neither ``"fp32"`` nor ``"bf16"``, or ``shard``
            is not a rank of this process's group (before any data is read).
    """
    _choice("precision", precision, INFERENCE_PRECISIONS)
    _check_shard(shard)
    correct = []
    for name, task in data.items():
        total = len(task.test_y)
        share = sum(min(batch_size, total - s) for s in shard_starts(total, batch_size, shard))
        count = 0
        with tqdm(
            total=share, desc=f"score {name}", unit="img", leave=False, disable=not progress
        ) as bar:
            for images, labels in eval_batches(task, batch_size, workers, device, shard):
                x = task.normalize(images.to(device))
                logits = predict(model, x, name, micro_batch, precision)
                count += int((logits.argmax(-1) == labels.to(device)).sum())
                bar.update(len(labels))
        correct.append(count)
    counts = torch.tensor(correct, dtype=torch.long, device=device)
    if shard[1] > 1:
        torch.distributed.all_reduce(counts)
    return {
        name: count / max(1, len(task.test_y))
        for (name, task), count in zip(data.items(), counts.tolist(), strict=True)
    }


def _check_shard(shard: tuple[int, int]) -> None:
    """``shard`` is a valid ``(rank, world_size)`` and, beyond one rank, this
    process's place in its process group."""
    shard_starts(0, 1, shard)
    if shard[1] == 1:
        return
    dist = torch.distributed
    found = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else None
    if found != tuple(shard):
        raise ConfigError(
            f"shard={shard} scores a share of the test batches, but this process is "
            f"{found or 'in no process group'}: pass its (rank, world_size), or (0, 1)"
        )
