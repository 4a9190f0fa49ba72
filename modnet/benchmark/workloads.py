"""What is measured: devices, precisions, workloads (inference, training, matmul), inputs.

Conventions follow timm's ``benchmark.py``: inference under
``torch.inference_mode`` in eval mode, training as one SGD step (forward,
cross-entropy, backward, update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..export import ExportedNet
from ..model import ModularNet

PRECISIONS = ("float32", "float16", "bfloat16", "amp_float16", "amp_bfloat16")


# ------------------------------------------------------------------ devices, dtypes


def resolve_device(name: str | torch.device) -> torch.device:
    """The device to measure on, refusing one that this machine cannot provide."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "the cuda device was requested but CUDA is not available "
            "(torch.cuda.is_available() is False): measure on --device cpu, or use a machine "
            "with an NVIDIA GPU and a CUDA build of torch"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"unsupported device {name!r}: use --device cpu or cuda (cuda:N)")
    return device


def synchronize(device: torch.device) -> None:
    """Waits for queued kernels, so that a timer sees the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Precision:
    """How a model runs: the dtype of its weights and inputs, and autocast if any."""

    name: str
    dtype: torch.dtype
    autocast: torch.dtype | None

    @classmethod
    def parse(cls, name: str) -> Precision:
        if name not in PRECISIONS:
            raise ConfigError(f"unknown precision {name!r}: choose one of {PRECISIONS}")
        if name.startswith("amp_"):
            return cls(name, torch.float32, getattr(torch, name[4:]))
        return cls(name, getattr(torch, name), None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in: what the machine's peak is measured in."""
        return self.autocast or self.dtype

    def context(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


# ----------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One side of a measurement: a step to time and the state it keeps alive.

    Attributes:
        step: Runs one batch (an inference forward or a training step).
        batch_size: Samples per step.
        device: Where the step runs.
        state: Tensors alive between steps (weights, optimizer state, inputs): the
            resident part of peak memory.
    """

    step: Callable[[], Any]
    batch_size: int
    device: torch.device
    state: Callable[[], Iterable[torch.Tensor]] = field(default=lambda: ())


def _caller(model: nn.Module, task: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return model if task is None else partial(model, task=task)


def inference_workload(
    model: nn.Module,
    x: torch.Tensor,
    task: Any = None,
    precision: Precision | None = None,
    micro_batch: int | None = None,
) -> Workload:
    """Forward passes in eval mode under ``torch.inference_mode``.

    Args:
        model: The network; put in eval mode. May be a ``torch.compile`` wrapper.
        x: The input batch.
        task: Passed as ``model(x, task=task)`` when given (modnet models).
        precision: Autocast, if any; weights and ``x`` must already have its dtype.
        micro_batch: Run the batch as consecutive forward passes of this many
            samples (as ``modnet.train.evaluate.predict`` does); None: one pass.
    """
    model.eval()
    call = _caller(model, task)
    amp = (precision or Precision.parse("float32")).context(x.device)
    chunks = x.split(micro_batch) if micro_batch else (x,)

    def step() -> list[torch.Tensor]:
        with torch.inference_mode(), amp:
            return [call(chunk) for chunk in chunks]

    return Workload(step, x.shape[0], x.device, lambda: [*_module_tensors(model), x])


def training_workload(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    task: Any = None,
    precision: Precision | None = None,
    lr: float = 1e-4,
) -> Workload:
    """One SGD step (momentum 0.9) on cross-entropy, as timm's training benchmark.

    Gradients are freed after every step (``zero_grad(set_to_none=True)``), so the
    peak memory of a step includes them.
    """
    model.train()
    call = _caller(model, task)
    amp = (precision or Precision.parse("float32")).context(x.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)

    def step() -> None:
        with amp:
            loss = F.cross_entropy(call(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state() -> list[torch.Tensor]:
        moments = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        return [*_module_tensors(model), *moments, x, y]

    return Workload(step, x.shape[0], x.device, state)


def matmul_workload(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None
) -> tuple[Workload, int]:
    """A dense ``size x size`` matmul: the machine's own FLOP/s limit, and its FLOPs.

    It runs as ``F.linear``, the kernel every ``nn.Linear`` of the models dispatches
    to. ``torch.mm`` is the same kernel in float32, but on a CPU without native
    bfloat16/float16 matmul it falls back to a generic loop (0.3 GFLOP/s against
    linear's 10 on a 2-core AVX2 machine, one thread), which made every reduced-
    precision share of it read far above 1.
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    return Workload(lambda: F.linear(a, b), 1, device, lambda: (a, b)), 2 * size**3


def _module_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


# ------------------------------------------------------------------- input batches


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` the model expects.

    Read from its patch embedding (timm ViTs) or its ``pretrained_cfg``.

    Raises:
        ValueError: The model has neither; ``make_batch(..., size=(C, H, W))`` takes
            the size directly.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        return (patch_embed.proj.in_channels, *patch_embed.img_size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" not in cfg:
        raise ValueError(
            f"cannot tell the input size of a {type(model).__name__} (no patch_embed.img_size, "
            "no pretrained_cfg['input_size']): pass make_batch(..., size=(channels, height, "
            "width))"
        )
    return tuple(cfg["input_size"])


def make_batch(
    model: nn.Module,
    batch_size: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    seed: int = 0,
    size: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images of the model's input size and random labels.

    Args:
        model: The network, whose input size is read (``input_size``) unless ``size``
            is given.
        batch_size: Images in the batch.
        num_classes: Labels are drawn from ``0 .. num_classes - 1``.
        device: Where the batch is put.
        dtype: The images' dtype.
        channels_last: Make the images NHWC.
        seed: Seed of the generator.
        size: ``(channels, height, width)``; default: the model's.

    Returns:
        Images ``[batch_size, C, H, W]`` and labels ``[batch_size]``.

    Raises:
        ValueError: ``size`` is not given and the model's cannot be read.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *(size or input_size(model)), generator=generator)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


def place(
    model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool = False
) -> nn.Module:
    """Moves ``model`` to ``device`` and ``dtype`` and runs it in one memory layout.

    The layout is set where it is decided: 4-D weights are made NHWC (or NCHW),
    and every module that converts its input itself (the conv family's trunk,
    ``ConvTrunk.memory_format``, also in an ``ExportedNet``'s copy) is set to the
    same layout (``set_memory_format``), so a side labelled NCHW runs NCHW.
    ``nn.Module.to(memory_format=...)`` refuses the 5-D stacked templates of a
    pool, so only 4-D tensors are converted (a mixed conv weight follows its input).

    Args:
        model: The network, moved in place.
        device: Where it runs.
        dtype: The dtype of its floating-point tensors.
        channels_last: NHWC if True, else NCHW (``torch.contiguous_format``).

    Returns:
        ``model``.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype)
    model._apply(lambda t: t.contiguous(memory_format=layout) if t.dim() == 4 else t)
    set_memory_format(model, layout)
    return model


def set_memory_format(model: nn.Module, layout: torch.memory_format) -> nn.Module:
    """Sets the layout every submodule that converts its own input converts it to.

    Such modules declare a ``memory_format`` class attribute (``ConvTrunk``: the
    conv family's trunk converts images and its stem's output to it, default
    ``torch.channels_last``); every convolution after them follows its input's
    layout. Other modules are left alone, so this is a no-op for a ViT.

    Args:
        model: The network; changed in place.
        layout: ``torch.channels_last`` (NHWC) or ``torch.contiguous_format`` (NCHW).

    Returns:
        ``model``.
    """
    for module in model.modules():
        if "memory_format" in vars(type(module)):
            module.memory_format = layout
    return model


def uses_convolutions(model: nn.Module) -> bool:
    """True when the model's pool or trunk convolves over more than patches.

    Such models are the ones channels_last speeds up; a ViT's only conv is its
    patch embedding.
    """
    if isinstance(model, ModularNet):
        return model.config.get("family") == "conv"
    if isinstance(model, ExportedNet):
        return any(isinstance(m, nn.Conv2d) for m in model.blocks.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return len(convs) > 1
