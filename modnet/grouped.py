"""Run one block for a batch whose samples belong to different tasks, with fixed shapes.

A mixed-task batch is not split by task. Every weight arrives stacked per task,
``[T, *shape]``, and every sample reads its task's slice by its task id, so no
shape depends on how many samples each task has: under ``torch.compile`` a new
mix of tasks is new data, not a new graph.

In eager chunks without autograd a linear layer's weight may instead arrive as
its K templates ``[K, out, in]``, with coefficients to mix them inside the layer
(``TemplatePool.mix_lazily``, see ``GroupedRunner.__call__``).

A weight may also arrive unstacked, one set for the whole batch (tasks that share
a layer's weights, ``TemplatePool.run_shared``): a layer then runs as the layer it
replaces, and only BatchNorm statistics stay per task.

Layers with parameters are replaced by per-sample versions that keep the
parameter names of the layer they replace, so the block's own ``forward`` runs
unchanged:

- ``nn.Linear``: a batched matmul with per-sample weights ``[B, out, in]``;
- ``nn.Conv2d``: a batched matmul for 1x1 convolutions (each sample's pixels as
  rows, NHWC), otherwise one grouped convolution with the batch folded into the
  channels of one channels_last image (``groups = B * groups``), whose output
  holds the samples interleaved (``[H, W, B, C]`` in memory): the layouts oneDNN
  runs fastest on CPU, where the grouped depthwise convolution in NCHW ran at a
  fraction of their speed;
- ``nn.LayerNorm``: normalisation without affine, then a per-sample affine;
- BatchNorm (``nn.BatchNorm2d`` and timm's ``BatchNormAct2d``): statistics per
  task from one-hot reductions, running statistics ``[T, C]`` updated per task.

Blocks holding parameters in any other layer are not supported (``to_grouped``
returns ``None``); ``ModularNet`` then runs such a batch task by task.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .binding import TensorBinder

# Extra tensors every replaced layer reads, substituted per call like its weights.
IDS = "task_ids"
SAMPLE_WEIGHT = "sample_weight"
# Coefficients ``[T, K]`` of a linear layer whose ``weight`` holds its K templates
# (``TemplatePool.mix_lazily``); empty when the weight is mixed already.
MIX = "mix_coefficients"

# Tasks whose linear weights are mixed at once just before their matmul: a ViT-tiny
# MLP weight is 0.6 MB per task, so two stay in a 2 MB L2 cache for the matmul that
# reads them. ``pytest bench/test_mixed_batches.py --benchmark-only -k bound``: a
# ViT-tiny block of 64 tasks ran 1.14-1.23x faster than with each chunk's weights
# mixed up front; 1, 2 and 4 tasks at a time measured within noise of each other.
# Re-measured with torch 2.14.1 it ran 0.88-0.93x (three runs): see the README.
MIX_TASKS = 2


def _per_sample(t: torch.Tensor, ids: torch.Tensor, shared_ndim: int) -> torch.Tensor:
    """``t[ids]`` for per-task tensors, ``t`` broadcast over the batch for shared ones."""
    return t.index_select(0, ids) if t.dim() > shared_ndim else t.unsqueeze(0)


class _Grouped(nn.Module):
    # Set for one eager call by ``GroupedRunner``: the batch holds the tasks in order,
    # ``group_size`` consecutive samples each (ids are then ``arange(T)`` repeated).
    group_size: int | None = None

    def _setup(self, source: nn.Module) -> None:
        for name, value in source.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(torch.empty_like(value, device="meta")))
        self.register_buffer(IDS, torch.empty(0, dtype=torch.long, device="meta"))


class GroupedLinear(_Grouped):
    """``nn.Linear`` with weights ``[T, out, in]`` and biases ``[T, out]``, or one
    weight set ``[out, in]`` for the whole batch (a plain linear layer)."""

    def __init__(self, source: nn.Linear):
        super().__init__()
        self._setup(source)
        self.register_buffer(MIX, torch.empty(0, device="meta"))
        self.has_bias = source.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 2:  # one weight set for the whole batch
            return F.linear(x, self.weight, self.bias if self.has_bias else None)
        ids = getattr(self, IDS)
        batch, width = x.shape[0], x.shape[-1]
        coefficients = getattr(self, MIX)
        if self.group_size is not None and coefficients.numel():
            return self._mix_and_multiply(x, coefficients)
        if self.group_size is not None:
            # One matmul per task with its own weights: no per-sample copy of them.
            weight, bias = self.weight, self.bias if self.has_bias else None
            flat = x.reshape(batch // self.group_size, -1, width)
        else:
            weight = _per_sample(self.weight, ids, 2)
            bias = _per_sample(self.bias, ids, 1) if self.has_bias else None
            flat = x.reshape(batch, -1, width)
        if bias is not None:
            bias = bias.unsqueeze(1)
            out = torch.baddbmm(bias, flat, weight.transpose(1, 2))
        else:
            out = torch.bmm(flat, weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _mix_and_multiply(self, x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """Tasks in order, ``group_size`` samples each, ``weight`` their templates
        ``[K, out, in]``: every ``MIX_TASKS`` tasks' weights are mixed (in the
        templates' dtype, outside autocast, as ``TemplatePool.mix``) right before
        the matmul that reads them."""
        templates = self.weight
        count, width = templates.shape[0], x.shape[-1]
        flat = templates.reshape(count, -1).t()
        rows = x.reshape(coefficients.shape[0], -1, width)
        coefficients = coefficients.to(templates.dtype)
        parts = []
        for start in range(0, rows.shape[0], MIX_TASKS):
            stop = start + MIX_TASKS
            with torch.autocast(x.device.type, enabled=False):
                weight = F.linear(coefficients[start:stop], flat).view(-1, *templates.shape[1:])
            if self.has_bias:
                bias = self.bias[start:stop].unsqueeze(1)
                parts.append(torch.baddbmm(bias, rows[start:stop], weight.transpose(1, 2)))
            else:
                parts.append(torch.bmm(rows[start:stop], weight.transpose(1, 2)))
        out = torch.cat(parts)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class GroupedConv2d(_Grouped):
    """``nn.Conv2d`` (zero padding) with weights ``[T, O, I/groups, kh, kw]``, or one
    weight set ``[O, I/groups, kh, kw]`` for the whole batch (a plain convolution).

    Takes ``[B, C, H, W]`` in any memory layout and, in eager mode, returns
    ``[B, O, H', W']`` NHWC (1x1) or sample-interleaved (other kernels); elementwise
    layers after it keep the layout. A 1x1 convolution reads either layout in
    place; other kernels read interleaved input in place and copy any other once.
    Under ``torch.compile`` it runs NCHW.
    """

    def __init__(self, source: nn.Conv2d):
        super().__init__()
        self._setup(source)
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.groups = source.dilation, source.groups
        self.has_bias = source.bias is not None
        self.pointwise = (
            source.kernel_size == (1, 1)
            and source.stride == (1, 1)
            and source.padding == (0, 0)
            and source.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.has_bias else None
        if self.weight.dim() == 4:  # one weight set for the whole batch
            stride, padding, dilation = self.stride, self.padding, self.dilation
            return F.conv2d(x, self.weight, bias, stride, padding, dilation, self.groups)
        ids = getattr(self, IDS)
        batch, channels, height, width = x.shape
        weight = self.weight.index_select(0, ids)
        bias = bias.index_select(0, ids) if bias is not None else None
        out_channels = weight.shape[1]
        # Under torch.compile layouts are the compiler's to choose, and the views of
        # the eager layouts fail in a compiled backward, whose gradients can arrive
        # in other strides than traced: there the batch runs NCHW.
        nchw = torch.compiler.is_compiling()
        if self.pointwise:
            matrix = weight.view(batch, out_channels, channels)
            if nchw:  # per sample [O, C] @ [C, H*W]
                rows = x.reshape(batch, channels, height * width)
                if bias is None:
                    out = torch.bmm(matrix, rows)
                else:
                    out = torch.baddbmm(bias.unsqueeze(2), matrix, rows)
                return out.view(batch, out_channels, height, width)
            # Per sample [H*W, C] @ [C, O]: a view of NHWC or interleaved input.
            rows = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            matrix = matrix.transpose(1, 2)
            if bias is None:
                out = torch.bmm(rows, matrix)
            else:
                out = torch.baddbmm(bias.unsqueeze(1), rows, matrix)
            return out.view(batch, height, width, out_channels).permute(0, 3, 1, 2)
        if nchw:
            folded = x.reshape(1, batch * channels, height, width)
        else:
            # The batch folded into the channels of one channels_last image: a view
            # when the samples are interleaved ([H, W, B, C] in memory).
            folded = x.permute(2, 3, 0, 1).reshape(1, height, width, batch * channels)
            folded = folded.permute(0, 3, 1, 2)
        out = F.conv2d(
            folded,
            weight.reshape(batch * out_channels, *weight.shape[2:]),
            None if bias is None else bias.reshape(-1),
            self.stride,
            self.padding,
            self.dilation,
            batch * self.groups,
        )
        out_height, out_width = out.shape[-2:]
        if nchw:
            return out.view(batch, out_channels, out_height, out_width)
        out = out.permute(0, 2, 3, 1).reshape(out_height, out_width, batch, out_channels)
        return out.permute(2, 3, 0, 1)


class GroupedLayerNorm(_Grouped):
    """``nn.LayerNorm`` over the last dimension with affine parameters ``[T, D]``, or
    one set ``[D]`` for the whole batch (a plain layer norm)."""

    def __init__(self, source: nn.LayerNorm):
        super().__init__()
        self._setup(source)
        self.normalized_shape, self.eps = source.normalized_shape, source.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        if all(t is None or t.dim() == 1 for t in (weight, bias)):  # one set for the batch
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        ids = getattr(self, IDS)
        out = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        if weight is not None:
            out = out * _per_sample(weight, ids, 1).view(shape)
        if bias is not None:
            out = out + _per_sample(bias, ids, 1).view(shape)
        return out


class GroupedBatchNorm(_Grouped):
    """BatchNorm with statistics per task, for inputs ``[B, C, *]``.

    In training mode each task's samples are normalised with that task's batch
    mean and (biased) variance, as if the task's samples ran alone; running
    statistics ``[T, C]`` move only for tasks with samples in the batch. Samples
    with ``sample_weight`` 0 (a layer that their task's route skips) count for
    nothing. Affine parameters may be per task ``[T, C]`` or shared ``[C]``.
    timm's ``BatchNormAct2d`` keeps its dropout and activation after the norm.
    """

    def __init__(self, source: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self._setup(source)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = source.get_buffer(name)
            self.register_buffer(name, torch.empty_like(value, device="meta"))
        self.register_buffer(SAMPLE_WEIGHT, torch.empty(0, device="meta"))
        self.eps, self.momentum = source.eps, source.momentum
        self.drop = copy.deepcopy(getattr(source, "drop", nn.Identity()))
        self.act = copy.deepcopy(getattr(source, "act", nn.Identity()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = getattr(self, IDS)
        batch, channels = x.shape[:2]
        shape = (batch, channels) + (1,) * (x.dim() - 2)
        mean, var = self.running_mean, self.running_var
        if self.training:
            mean, var = self._task_moments(x, ids)
        inv = torch.rsqrt(var + self.eps)
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        scale = inv if weight is None else inv * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        # one pass over x (a multiply, then an add, read a large x twice)
        scale, shift = scale.index_select(0, ids).view(shape), shift.index_select(0, ids)
        out = torch.addcmul(shift.view(shape), x, scale)
        return self.act(self.drop(out))

    def _task_moments(self, x: torch.Tensor, ids: torch.Tensor):
        tasks = self.running_mean.shape[0]
        reduce = tuple(range(2, x.dim()))
        per_sample = x[0, 0].numel()
        members = F.one_hot(ids, tasks).to(x.dtype) * getattr(self, SAMPLE_WEIGHT).unsqueeze(1)
        present = members.sum(0)
        count = (present * per_sample).clamp(min=1).unsqueeze(1)
        mean = members.t() @ x.sum(reduce) / count
        centred = x - mean.index_select(0, ids).view(x.shape[:2] + (1,) * len(reduce))
        var = members.t() @ centred.square().sum(reduce) / count
        with torch.no_grad():
            moved = present.unsqueeze(1) > 0
            momentum = self.momentum
            unbiased = var * count / (count - 1).clamp(min=1)
            for stat, value in ((self.running_mean, mean), (self.running_var, unbiased)):
                stat.copy_(torch.where(moved, torch.lerp(stat, value.detach(), momentum), stat))
            self.num_batches_tracked.add_(moved.squeeze(1).to(self.num_batches_tracked.dtype))
        return mean, var


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


def _is_batch_norm(module: nn.Module) -> bool:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return False
    return module.track_running_stats and module.momentum is not None


def _replacement(module: nn.Module, per_task: bool) -> nn.Module | None:
    if _is_batch_norm(module):
        return GroupedBatchNorm(module)
    if not per_task:
        return None
    if type(module) is nn.Linear:
        return GroupedLinear(module)
    if type(module) is nn.Conv2d and module.padding_mode == "zeros":
        if isinstance(module.padding, str):
            return None
        return GroupedConv2d(module)
    if _is_layer_norm(module):
        return GroupedLayerNorm(module)
    return None


class GroupedRunner:
    """Runs a copy of ``module`` whose layers take per-task tensors and task ids.

    Args:
        module: The module to copy (a pool's block skeleton or a trunk). It is not
            modified; the copy lives on the meta device and every tensor is passed in.
        per_task: Whether parameters are per task (a pool block: every layer with
            parameters is replaced) or shared (a trunk: only BatchNorm is replaced,
            its statistics being per task).
    """

    def __init__(self, module: nn.Module, per_task: bool):
        skeleton = copy.deepcopy(module).to("meta")
        self.replaced: list[str] = []
        for path, child in list(skeleton.named_modules()):
            if not path or not list(child.parameters(recurse=False)) and not _is_batch_norm(child):
                continue
            new = _replacement(child, per_task)
            if new is None:
                if per_task or _is_batch_norm(child):
                    raise TypeError(f"{type(child).__name__} at '{path}' has no grouped version")
                continue
            new.train(child.training)
            owner_path, _, attr = path.rpartition(".")
            setattr(skeleton.get_submodule(owner_path), attr, new)
            self.replaced.append(path)
        self.module = skeleton
        names = [n for n, _ in skeleton.named_parameters()]
        names += [n for n, _ in skeleton.named_buffers()]
        self.tensor_names = tuple(names)
        self._ids = tuple(n for n in names if n.rpartition(".")[2] == IDS)
        self._weights = tuple(n for n in names if n.rpartition(".")[2] == SAMPLE_WEIGHT)
        self._mixes = tuple(n for n in names if n.rpartition(".")[2] == MIX)
        # weight -> the coefficients that mix it in place (see ``GroupedLinear``)
        self.mixed_in_place = {f"{n.rpartition('.')[0]}.weight": n for n in self._mixes}
        self._binder = TensorBinder(skeleton, names)
        self._grouped = [m for m in skeleton.modules() if isinstance(m, _Grouped)]

    @classmethod
    def build(cls, module: nn.Module, per_task: bool) -> GroupedRunner | None:
        """The runner, or ``None`` when a layer with parameters has no grouped version."""
        try:
            return cls(module, per_task)
        except TypeError:
            return None

    @property
    def batch_norms(self) -> list[GroupedBatchNorm]:
        return [m for m in self.module.modules() if isinstance(m, GroupedBatchNorm)]

    def __call__(
        self,
        tensors: dict[str, torch.Tensor],
        ids: torch.Tensor,
        sample_weight: torch.Tensor,
        *args,
        group_size: int | None = None,
        mix: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Runs the copy with ``tensors`` (per-task or shared), task ids ``[B]`` and
        per-sample weights ``[B]`` (1 where the sample's task runs this block).

        ``group_size`` (eager mode only) says that the batch holds every task in
        order, ``group_size`` consecutive samples each: linear layers then multiply
        each task's samples by its weights without copying them per sample. With it,
        ``mix`` may give coefficients ``[T, K]`` under names of ``mixed_in_place``
        values: those linear layers' weights in ``tensors`` are then their templates
        ``[K, out, in]``, mixed a few tasks at a time inside the layer.
        """
        tensors = dict(tensors)
        for name in self._ids:
            tensors[name] = ids
        for name in self._weights:
            tensors[name] = sample_weight
        if self._mixes:
            empty = sample_weight.new_empty(0)
            for name in self._mixes:
                tensors[name] = empty
        if mix:
            if group_size is None:
                raise ValueError("weights mixed in place need group_size (tasks in order)")
            tensors.update(mix)
        if group_size is None:
            return self._binder(tensors, *args)
        for module in self._grouped:
            module.group_size = group_size
        try:
            return self._binder(tensors, *args)
        finally:
            for module in self._grouped:
                module.group_size = None
