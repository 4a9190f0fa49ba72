"""Block families: the trunk (stem, final norm, pooling) and the block of a pool.

A family builder returns a ``Family``: everything ``ModularNet`` needs apart from
routes and heads. Trunks implement ``embed``, ``norm`` and ``pre_logits`` and a
``forward(x, stage)`` that dispatches to them, so per-task statistics can be
bound to any stage.
"""

from .base import Family, Trunk
from .conv import conv_family
from .timm_trunk import TimmTrunk, timm_family, timm_family_by_name, vit_family

__all__ = [
    "Family",
    "Trunk",
    "TimmTrunk",
    "conv_family",
    "timm_family",
    "timm_family_by_name",
    "vit_family",
]
