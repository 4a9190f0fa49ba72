"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a fixed affine map per channel, so a convolution
followed by one equals the convolution with weight ``W * s`` and bias
``(b - mean) * s + beta``, where ``s = gamma / sqrt(var + eps)`` (Ioffe and
Szegedy 2015; the same rewrite as ``torch.fx.experimental.optimization.fuse``
and the reparameterisation of RepVGG-style timm models). A pool cannot fold
once and keep the result: every task mixes its own weights and brings its own
statistics. So the fold is done per call, on the tensors the call was given:
a few elementwise ops on the weights, against one full pass over the
activations per BatchNorm saved. For ``modnet_conv_tiny`` at a micro-batch of
16 images on one CPU core, the BatchNorms are a quarter of inference time.

Folding changes the arithmetic, not the function: outputs agree with the
unfolded block within float rounding (about 1e-6 relative in fp32).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from timm.layers import BatchNormAct2d
from torch import fx, nn

from .binding import TensorBinder
from .grouped import GroupedRunner


@dataclass(frozen=True)
class ConvNormPair:
    """A convolution whose only use is the BatchNorm after it, by their names in the block."""

    conv: str
    norm: str
    affine: bool
    conv_bias: bool


class _LeafTracer(fx.Tracer):
    """Keeps convolutions and BatchNorms (timm's ``BatchNormAct2d`` too) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def _after_norm(norm: nn.Module) -> nn.Module | None:
    """What the BatchNorm module does after normalising, or None for an unknown kind."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm) is BatchNormAct2d:  # batch_norm, then drop, then act
        after = nn.Sequential(copy.deepcopy(norm.drop), copy.deepcopy(norm.act))
        # An act or drop with tensors of its own (PReLU) stays with the unfolded block.
        return None if any(True for _ in (*after.parameters(), *after.buffers())) else after
    return None


def conv_norm_pairs(block: nn.Module) -> list[ConvNormPair]:
    """The conv -> BatchNorm pairs of ``block`` that can be folded.

    A pair qualifies when the BatchNorm (``nn.BatchNorm2d`` or timm's
    ``BatchNormAct2d``, with running statistics) takes the convolution's output,
    nothing else uses that output, and the block calls each of the two once. A
    block ``torch.fx`` cannot trace has none.
    """
    try:
        graph = _LeafTracer().trace(block)
    except Exception:  # noqa: BLE001 - any untraceable block simply runs unfolded
        return []
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        norm = block.get_submodule(node.target)
        source = node.args[0]
        if (
            not isinstance(norm, nn.modules.batchnorm._BatchNorm)
            or not norm.track_running_stats
            or _after_norm(norm) is None
            or not isinstance(source, fx.Node)
            or source.op != "call_module"
            or len(source.users) != 1
            or calls[node.target] != 1  # a module called twice would be folded for both
            or calls[source.target] != 1
        ):
            continue
        conv = block.get_submodule(source.target)
        if type(conv) is not nn.Conv2d or conv.out_channels != norm.num_features:
            continue
        pairs.append(ConvNormPair(source.target, node.target, norm.affine, conv.bias is not None))
    return pairs


class FoldedRunner:
    """Runs a block with each foldable BatchNorm folded into its convolution.

    Built once per pool from its skeleton block (meta tensors); called with the
    same tensors as the unfolded block. Used only where folding computes what the
    block would: every folded BatchNorm in eval mode, no autograd, no hooks; and
    not under ``torch.jit.trace``, whose trace check re-runs the model with
    autograd off and would see another graph.

    Args:
        skeleton: The block that runs unfolded (its modules' modes are read per call).
        pairs: Its foldable pairs (``conv_norm_pairs``), at least one.
        names: Every tensor the unfolded block is called with.
    """

    def __init__(self, skeleton: nn.Module, pairs: list[ConvNormPair], names: tuple[str, ...]):
        self.skeleton = skeleton
        self.pairs = pairs
        self.norms = [skeleton.get_submodule(p.norm) for p in pairs]
        folded = copy.deepcopy(skeleton)
        for pair, norm in zip(pairs, self.norms, strict=True):
            conv = folded.get_submodule(pair.conv)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.empty(conv.out_channels, device="meta"))
            folded.set_submodule(pair.norm, _after_norm(norm))
        folded.eval()
        dropped = tuple(p.norm + "." for p in pairs)
        kept = tuple(n for n in names if not n.startswith(dropped))
        biases = tuple(p.conv + ".bias" for p in pairs if not p.conv_bias)
        self.module = folded
        self._binder = TensorBinder(folded, (*kept, *biases))
        # Mixed-task batches: the folded block with per-task tensors (``modnet.grouped``).
        self.grouped = GroupedRunner.build(folded, per_task=True)

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The running statistics ``fold`` reads."""
        return tuple(p.norm + s for p in self.pairs for s in (".running_mean", ".running_var"))

    @classmethod
    def build(cls, skeleton: nn.Module, names: tuple[str, ...]) -> FoldedRunner | None:
        """A runner for ``skeleton``, or None when it has nothing to fold."""
        pairs = conv_norm_pairs(skeleton)
        return cls(skeleton, pairs, names) if pairs else None

    def applies(self) -> bool:
        """Whether folding gives what the block computes now: eval mode, no autograd."""
        if torch.is_grad_enabled() or self.skeleton.training or torch.jit.is_tracing():
            return False
        return not any(n.training or n._forward_hooks or n._forward_pre_hooks for n in self.norms)

    def fold(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The folded block's tensors from the unfolded block's.

        Works on one layer's tensors or on every layer's (or task's) stacked along
        a leading axis (weights ``[L, O, I, kh, kw]``, statistics ``[L, C]``): one
        fold for all layers costs what folding one layer does. Low-precision weights are
        folded in float32 and rounded once.
        """
        folded = {n: tensors[n] for n in self._binder.names if n in tensors}
        for pair, norm in zip(self.pairs, self.norms, strict=True):
            weight = tensors[pair.conv + ".weight"]
            dtype = weight.dtype
            wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            scale = torch.rsqrt(tensors[pair.norm + ".running_var"].to(wide) + norm.eps)
            mean = tensors[pair.norm + ".running_mean"].to(wide)
            if pair.conv_bias:
                mean = mean - tensors[pair.conv + ".bias"].to(wide)
            if pair.affine:
                scale = scale * tensors[pair.norm + ".weight"].to(wide)
                bias = torch.addcmul(tensors[pair.norm + ".bias"].to(wide), mean, scale, value=-1)
            else:
                bias = -mean * scale
            folded[pair.conv + ".weight"] = (weight.to(wide) * scale[..., None, None, None]).to(
                dtype
            )
            folded[pair.conv + ".bias"] = bias.to(dtype)
        return folded

    def run(self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Runs the folded block with tensors ``fold`` made (extra names are ignored)."""
        return self._binder(tensors, x)

    def __call__(self, tensors: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Folds one layer's tensors and runs the block with them."""
        return self._binder(self.fold(tensors), x)
