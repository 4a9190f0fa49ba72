"""What a block family provides to ``ModularNet``."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from ..errors import ConfigError
from ..pool import TemplatePool

STAGES = ("embed", "norm", "pre_logits")

# The fields of ``pretrained_cfg`` that say how timm's eval transform resizes and crops
# an image (``timm.data.resolve_model_data_config``), besides input size and mean/std.
PREPROCESSING_KEYS = ("interpolation", "crop_pct", "crop_mode")

# The poolings of timm's ``SelectAdaptivePool2d`` ("" for none); it also takes a
# ``fast`` variant of each, which stays accepted.
ADAPTIVE_POOLS = ("avg", "max", "avgmax", "catavgmax", "")


def check_pool_name(global_pool: Any, choices: tuple[str, ...], accepted: bool = False) -> None:
    """Refuses a ``global_pool`` that is not one of ``choices`` (or ``accepted`` anyway).

    Raises:
        ConfigError: Naming the value and the choices.
    """
    if isinstance(global_pool, str) and (accepted or global_pool in choices):
        return
    names = ", ".join(repr(c) for c in choices if c)
    raise ConfigError(
        f"unknown global_pool {global_pool!r}: choose one of {names}, or '' for no pooling"
    )


def check_adaptive_pool(global_pool: Any, classifier: bool = False) -> None:
    """Refuses a pooling that timm's ``SelectAdaptivePool2d`` does not take, and no
    pooling (``""``) in front of a linear classifier, which needs pooled features
    (timm refuses it too: "Pooling can only be disabled if classifier is also removed").

    Args:
        global_pool: The pooling name.
        classifier: Whether a task with classes (a linear head) takes the pooled features.

    Raises:
        ConfigError: An unknown pooling, or ``""`` with a classifier.
    """
    accepted = False
    if isinstance(global_pool, str):
        try:
            SelectAdaptivePool2d(pool_type=global_pool)
            accepted = True
        except AssertionError:  # timm's way of refusing a pooling name
            pass
    check_pool_name(global_pool, ADAPTIVE_POOLS, accepted)
    if classifier and not global_pool:
        raise ConfigError(
            "global_pool='' (no pooling) cannot feed a linear classifier, which needs pooled "
            "features: use num_classes=0 to get the unpooled feature maps, or a pooling "
            "such as 'avg'"
        )


def image_size(img_size: Any) -> int | tuple[int, int]:
    """``img_size`` checked, as a config records it: an int for square images, else
    ``(height, width)`` (timm's convention; a square pair becomes its int).

    Raises:
        ConfigError: Anything but a positive int or a pair of positive ints.
    """
    pair = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(pair) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair
    ):
        raise ConfigError(
            f"img_size must be a positive int or a (height, width) pair of them, got {img_size!r}"
        )
    return pair[0] if pair[0] == pair[1] else pair


def check_divisible(name: str, value: Any, by_name: str, by: int) -> None:
    """Refuses ``value`` (an int, or a pair such as ``img_size``) not divisible by ``by``.

    Raises:
        ConfigError: Naming both options and the fix; also ``by`` below 1.
    """
    try:  # a numpy or 0-d tensor integer too, not a bool
        index = None if isinstance(by, bool) else operator.index(by)
    except TypeError:
        index = None
    if index is None or index < 1:
        raise ConfigError(f"{by_name} must be a positive int, got {by!r}")
    by = index
    sizes = value if isinstance(value, tuple) else (value,)
    if any(size % by for size in sizes):
        raise ConfigError(
            f"{name}={value!r} must be divisible by {by_name}={by}: choose {name} as a "
            f"multiple of {by_name}"
        )


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

    def check_global_pool(self, global_pool: Any = None, classifier: bool = False) -> None:
        """Refuses a pooling this trunk cannot use, before anything is changed.

        Args:
            global_pool: A pooling name (see ``set_global_pool``); ``None`` checks the
                current one.
            classifier: Whether a linear head (a task with classes) takes the pooled
                features.

        Raises:
            ConfigError: An unknown pooling, or no pooling (``""``) with a classifier.
        """
        check_adaptive_pool(
            self.global_pool.pool_type if global_pool is None else global_pool, classifier
        )

    def set_global_pool(self, global_pool: str) -> None:
        """Replaces the pooling: ``"avg"``, ``"max"``, ``"avgmax"``, ``"catavgmax"``, or
        ``""`` (none: only for tasks without a head, see ``check_global_pool``)."""
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_hidden_size = self.pool_width(global_pool)

    def feature_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial size ``(H', W')`` of a layer's output for inputs of ``size``."""
        return (size[0] // self.reduction, size[1] // self.reduction)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in a layer's output (class, registers): none
        for feature maps."""
        return 0

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
    # How timm's eval transform resizes and crops inputs (``pretrained_cfg``): a converted
    # model takes its source's, so both see the same pixels.
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    # The faster precision on CPU for this family (bench/test_precision.py).
    default_precision: str = "fp32"
    # Converted models only: each source block's drop-path rate and BatchNorm statistics.
    drop_path_rates: list[float] | None = None
    layer_stats: list[dict[str, torch.Tensor]] | None = None
