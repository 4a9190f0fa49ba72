"""Conv family: MobileNetV2 inverted residuals at one fixed resolution.

The reference configuration of the compositional-models paper: a strided stem
takes 32x32 images to 16x16x40, then identical inverted residual blocks
(1x1 expand by 6, 3x3 depthwise, 1x1 project, BatchNorm, residual).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import BatchNormAct2d, create_conv2d, get_act_layer, to_2tuple
from timm.layers.create_act import _ACT_LAYER_DEFAULT
from timm.models._efficientnet_blocks import InvertedResidual
from timm.models._efficientnet_builder import _init_weight_goog
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

from ..errors import ConfigError
from ..pool import TemplatePool
from .base import Family, Trunk, check_adaptive_pool, check_divisible, image_size


def check_act(act: Any) -> None:
    """Refuses an activation name that timm's ``get_act_layer`` does not know.

    Raises:
        ConfigError: Naming the value and timm's activation names.
    """
    try:
        get_act_layer(act)
    except KeyError:
        names = ", ".join(sorted(_ACT_LAYER_DEFAULT))  # every name get_act_layer knows
        raise ConfigError(f"unknown activation act={act!r}: choose one of {names}") from None


def make_inverted_residual(width: int, exp_ratio: float, act: str) -> InvertedResidual:
    """A freshly initialised block whose last BatchNorm starts at zero.

    Zero-initialising the last norm makes every block start as the identity, which
    keeps deep stacks of mixed templates trainable from the first step.
    """
    block = InvertedResidual(width, width, exp_ratio=exp_ratio, act_layer=get_act_layer(act))
    block.apply(_init_weight_goog)
    nn.init.zeros_(block.bn3.weight)
    return block


class ConvTrunk(Trunk):
    """Strided conv stem, final BatchNorm + activation, global average pooling.

    Images are converted to ``memory_format`` (default ``torch.channels_last``, which
    ``bench/test_channels_last.py`` measures faster on CPU for training and inference)
    before the stem, so every convolution after it runs in that layout whatever the
    caller's layout; ``torch.contiguous_format`` keeps NCHW.
    """

    memory_format: torch.memory_format = torch.channels_last

    def __init__(
        self,
        in_chans: int,
        width: int,
        img_size: int | tuple[int, int],
        stem_stride: int,
        act: str,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        act_layer = get_act_layer(act)
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.num_features = width
        self.reduction = stem_stride
        self.first_conv = "stem.0"
        self.stem = nn.Sequential(
            create_conv2d(in_chans, width, 3, stride=stem_stride),
            BatchNormAct2d(width, act_layer=act_layer),
        )
        self.final_norm = BatchNormAct2d(width, act_layer=act_layer)
        self.set_global_pool(global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.apply(_init_weight_goog)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.func transforms (vmap: per-sample Fisher) only the default layout exists.
        if torch.compiler.is_compiling() or not is_functorch_wrapped_tensor(x):
            # The stem's output too: a one-channel image is both NCHW and NHWC, and
            # the convolution then writes NCHW, which every layer after it would keep.
            x = x.contiguous(memory_format=self.memory_format)
            return self.stem(x).contiguous(memory_format=self.memory_format)
        return self.stem(x)

    def feature_size(self, size: tuple[int, int]) -> tuple[int, int]:
        conv = self.stem[0]
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                size, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
            )
        )

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_drop(self.global_pool(x))

    def stem_parameters(self) -> list[nn.Parameter]:
        return list(self.stem.parameters())


def conv_family(
    num_templates: int = 4,
    width: int = 40,
    exp_ratio: float = 6.0,
    img_size: int | tuple[int, int] = 32,
    in_chans: int = 3,
    stem_stride: int = 2,
    act: str = "relu6",
    global_pool: str = "avg",
    drop_rate: float = 0.0,
) -> Family:
    """Builds the conv trunk and a pool of ``num_templates`` inverted residuals.

    ``img_size`` is an int for square images or a ``(height, width)`` pair, each
    divisible by ``stem_stride``.
    ``global_pool`` is timm's pooling name: ``"avg"``, ``"max"``, ``"avgmax"``,
    ``"catavgmax"``, or ``""`` for none, which only a model without a head takes
    (``num_classes=0``: the forward returns the unpooled maps ``[B, C, H', W']``, as
    in timm); ``drop_rate`` is dropout on the pooled features before a head (timm's
    ``drop_rate``).

    Raises:
        ConfigError: An ``img_size`` that is not a positive int or pair, or not
            divisible by ``stem_stride``; an unknown ``act`` or ``global_pool``.
    """
    img_size = image_size(img_size)
    check_divisible("img_size", img_size, "stem_stride", stem_stride)
    check_act(act)
    check_adaptive_pool(global_pool)
    factory = partial(make_inverted_residual, width, exp_ratio, act)
    pool = TemplatePool([factory() for _ in range(num_templates)], block_factory=factory)
    trunk = ConvTrunk(in_chans, width, img_size, stem_stride, act, global_pool, drop_rate)
    config = dict(
        family="conv",
        num_templates=num_templates,
        width=width,
        exp_ratio=exp_ratio,
        img_size=img_size,
        in_chans=in_chans,
        stem_stride=stem_stride,
        act=act,
    )
    if global_pool != "avg":
        config["global_pool"] = global_pool
    if drop_rate:
        config["drop_rate"] = drop_rate
    return Family(trunk=trunk, pool=pool, config=config)
