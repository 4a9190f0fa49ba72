"""FLOPs of one step as ``torch.utils.flop_counter`` counts them (a MAC is two FLOPs)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .workloads import Workload


def count_flops(workload: Workload) -> int:
    """FLOPs of one step (matmuls, convolutions, attention), as ``FlopCounterMode`` counts.

    For modnet this includes mixing the templates into the layers' weights.
    """
    custom = {torch.ops.aten.convolution_backward: _conv_backward_flops}
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
