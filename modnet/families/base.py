"""What a block family provides to ``ModularNet``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..pool import TemplatePool

STAGES = ("embed", "norm", "pre_logits")


class Trunk(nn.Module):
    """The shared, unrouted parts of a network: stem, final norm and pooling.

    Subclasses set ``in_chans``, ``img_size`` (``None`` when any size works),
    ``num_features`` and implement the three stages.
    """

    in_chans: int
    img_size: tuple[int, int] | None
    num_features: int

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stem_parameters(self) -> list[nn.Parameter]:
        """Parameters of the input embedding: what "route + stem" adaptation may train."""
        raise NotImplementedError

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
