"""Per-task BatchNorm running statistics.

Templates are shared across tasks and layers, but the activations a mixed block
sees differ per task and per layer, so running statistics cannot be shared
(Zhmoginov et al. keep them per task). Each task owns one ``TaskNormStats``:
the statistics of every layer position, stacked ``[depth, ...]``, plus those of
the trunk (stem and final norm).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .binding import mangle


class TaskNormStats(nn.Module):
    """Running statistics of one task.

    Args:
        depth: Number of layer positions.
        layer_stats: Initial values of one block's BatchNorm buffers, by dotted name.
        trunk_stats: Initial values of the trunk's BatchNorm buffers, by dotted name.
    """

    def __init__(
        self,
        depth: int,
        layer_stats: Mapping[str, torch.Tensor],
        trunk_stats: Mapping[str, torch.Tensor],
    ):
        super().__init__()
        self.layer_names = tuple(layer_stats)
        self.trunk_names = tuple(trunk_stats)
        # Attribute names are computed once: layer() runs for every block of every forward.
        self._layer_attrs = tuple((n, "layers__" + mangle(n)) for n in self.layer_names)
        self._trunk_attrs = tuple((n, "trunk__" + mangle(n)) for n in self.trunk_names)
        for name, value in layer_stats.items():
            stacked = value.detach().unsqueeze(0).repeat(depth, *([1] * value.ndim)).clone()
            self.register_buffer("layers__" + mangle(name), stacked)
        for name, value in trunk_stats.items():
            self.register_buffer("trunk__" + mangle(name), value.detach().clone())

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """Views of layer ``index``'s statistics: BatchNorm updates them in place."""
        return {n: getattr(self, attr)[index] for n, attr in self._layer_attrs}

    def layer_stack(self, name: str) -> torch.Tensor:
        """One statistic of every layer, ``[depth, ...]`` (the buffer itself)."""
        return getattr(self, "layers__" + mangle(name))

    def trunk(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, attr) for n, attr in self._trunk_attrs}
