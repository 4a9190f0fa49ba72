"""FLOPs of one step as ``torch.utils.flop_counter`` counts them (a MAC is two FLOPs)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from .workloads import Workload


def _cpu_attention_flops() -> dict[Any, Any]:
    """torch's attention formulas for the CPU flash-attention kernels it leaves out.

    ``scaled_dot_product_attention`` on the CPU dispatches to
    ``_scaled_dot_product_flash_attention_for_cpu`` (and its ``_backward``), which
    ``FlopCounterMode`` does not count; their arguments start as those of the CUDA
    kernels it does count (``grad_out`` for the backward, then query, key, value), so
    the same formulas apply: two matmuls forward, five backward.
    """
    aten = torch.ops.aten
    kernels = {
        "_scaled_dot_product_flash_attention_for_cpu": _attention_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _attention_backward_flops,
    }
    return {getattr(aten, name): f for name, f in kernels.items() if hasattr(aten, name)}


def _attention_flops(query_shape, key_shape, value_shape, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *_: Any, **__: Any
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_flops(workload: Workload) -> int:
    """FLOPs of one step (matmuls, convolutions, attention), as ``FlopCounterMode`` counts.

    For modnet this includes mixing the templates into the layers' weights. Two
    corrections to torch's counter: the CPU attention kernels are counted (torch
    counts only the CUDA ones), and the weight gradient of a grouped convolution
    costs what its forward does. Elementwise work (norms, activations, softmax) is
    not counted.

    Args:
        workload: The step to count; it runs once.

    Returns:
        FLOPs of one step (a multiply-add is two), forward and backward for a
        training step.
    """
    custom = {torch.ops.aten.convolution_backward: _conv_backward_flops, **_cpu_attention_flops()}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        workload.step()
    return counter.get_total_flops()


def _conv_backward_flops(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
    _output_padding, _groups, output_mask, out_shape=None, **_: Any,
) -> int:  # fmt: skip
    """Each gradient of a convolution costs what its forward costs, groups included.

    torch's own formula counts the weight gradient of a grouped (depthwise) conv as
    if it were dense, ``channels`` times too many for an inverted residual.
    """
    positions = x_shape if transposed else grad_out_shape
    forward = 2 * positions[0] * math.prod(positions[2:]) * math.prod(w_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
