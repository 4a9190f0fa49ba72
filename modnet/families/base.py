"""What a block family provides to ``ModularNet``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from ..pool import TemplatePool

STAGES = ("embed", "norm", "pre_logits")


class Trunk(nn.Module):
    """The shared, unrouted parts of a network: stem, final norm and pooling.

    Subclasses set ``in_chans``, ``img_size`` (``None`` when any size works),
    ``num_features`` (channels of a layer's output), ``head_hidden_size`` (width
    of the pooled features a head sees), ``reduction`` (input pixels per feature
    map pixel), ``first_conv`` (name of the stem's first conv, for timm's cfg) and
    implement the three stages. The defaults below suit trunks whose layers work
    on ``[B, C, H, W]`` maps with a ``global_pool`` ``SelectAdaptivePool2d``.
    """

    in_chans: int
    img_size: tuple[int, int] | None
    num_features: int
    head_hidden_size: int
    reduction: int
    first_conv: str

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stem_parameters(self) -> list[nn.Parameter]:
        """Parameters of the input embedding: what "route + stem" adaptation may train."""
        raise NotImplementedError

    def pool_width(self, global_pool: str) -> int:
        """Width of the pooled features with pooling ``global_pool``."""
        return self.num_features * SelectAdaptivePool2d(pool_type=global_pool).feat_mult()

    def set_global_pool(self, global_pool: str) -> None:
        """Replaces the pooling: ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``, ``""``."""
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.pool_width(global_pool)

    def feature_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial size ``(H', W')`` of a layer's output for inputs of ``size``."""
        return (size[0] // self.reduction, size[1] // self.reduction)

    def format_intermediate(
        self, x: torch.Tensor, size: tuple[int, int], output_fmt: str
    ) -> torch.Tensor:
        """A layer's output as ``NCHW`` maps or ``NLC`` tokens (timm's output formats)."""
        return x if output_fmt == "NCHW" else x.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        if stage == "embed":
            return self.embed(x)
        if stage == "norm":
            return self.norm(x)
        if stage == "pre_logits":
            return self.pre_logits(x)
        raise ValueError(f"unknown trunk stage {stage!r}: one of {STAGES}")


@dataclass
class Family:
    """A trunk, a template pool, and the config that rebuilds them."""

    trunk: Trunk
    pool: TemplatePool
    config: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    # The faster precision on CPU for this family (bench/test_precision.py).
    default_precision: str = "fp32"
    # Converted models only: each source block's drop-path rate and BatchNorm statistics.
    drop_path_rates: list[float] | None = None
    layer_stats: list[dict[str, torch.Tensor]] | None = None
