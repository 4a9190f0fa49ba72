"""Trunks for timm models whose ``blocks`` are identical: ViT, MLP-Mixer/ResMLP/gMLP, ConvMixer.

The timm model keeps everything but its blocks and classifier; its own embedding,
final norm and pooling code run unchanged, which is what makes a converted model
give timm's logits exactly. Only classes whose forward is exactly
"embed, blocks in order, norm, head" are accepted; anything else is refused.
"""

from __future__ import annotations

import copy
import re
from functools import partial
from typing import Any

import timm
import torch
from timm.models._manipulate import named_apply
from timm.models.convmixer import ConvMixer
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer, init_weights_vit_timm
from torch import nn

from ..binding import is_batchnorm_buffer
from ..drop_path import block_rate
from ..errors import ConfigError
from ..pool import TemplatePool
from .base import (
    PREPROCESSING_KEYS,
    Family,
    Trunk,
    check_adaptive_pool,
    check_divisible,
    check_pool_name,
    image_size,
)

# Exact classes only: subclasses (distilled DeiT, BEiT, EVA, ...) change the forward.
SUPPORTED = {VisionTransformer: "vit", MlpMixer: "mixer", ConvMixer: "convmixer"}
# The poolings timm's VisionTransformer and MlpMixer take ("" for none); ViT's
# attention pools are built with the model, so only creation chooses them.
POOLS = {"vit": ("token", "avg", "avgmax", "max", "map", "prr", ""), "mixer": ("avg", "")}
ATTENTION_POOLS = ("map", "prr")


def fresh_block_like(reference: nn.Module, kind: str = "vit") -> nn.Module:
    """A freshly initialised copy of ``reference``.

    Token blocks get timm's ViT initialisation (Linear, norms, scales); ConvMixer
    blocks PyTorch's default initialisation of their convolutions and norms, as
    timm's ``ConvMixer`` uses.
    """
    block = copy.deepcopy(reference)
    if kind == "convmixer":
        for module in block.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return block
    named_apply(init_weights_vit_timm, block)
    return block


def _kind(model: nn.Module) -> str:
    kind = SUPPORTED.get(type(model))
    if kind is None:
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise ConfigError(
            f"from_timm cannot convert this {type(model).__name__} faithfully: it converts the "
            f"timm classes {names} (e.g. vit_*, deit3_*, mixer_*, resmlp_*, gmlp_*, "
            "convmixer_*), whose forward is embed, identical `blocks`, norm, head"
        )
    if kind == "vit" and getattr(model, "attn_pool", None) is None and model.global_pool == "map":
        raise ConfigError("from_timm: a ViT with global_pool='map' but no attention pool")
    return kind


class TimmTrunk(Trunk):
    """Wraps a timm model with its ``blocks`` removed and its classifier reset.

    Args:
        model: A timm ``VisionTransformer``, ``MlpMixer`` or ``ConvMixer``. It is
            modified in place.

    Raises:
        ConfigError: Another class (see ``SUPPORTED``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.kind = _kind(model)
        if self.kind == "convmixer":
            conv = model.stem[0]
            self.in_chans = conv.in_channels
            self.img_size = None
            self.reduction = conv.stride[0]
            self.first_conv = "model.stem.0"
        else:
            embed = model.patch_embed if self.kind == "vit" else model.stem
            self.in_chans = embed.proj.in_channels
            dynamic = getattr(model, "dynamic_img_size", False) or embed.img_size is None
            self.img_size = None if dynamic else tuple(embed.img_size)
            self.reduction = embed.feat_ratio()
            name = "patch_embed" if self.kind == "vit" else "stem"
            self.first_conv = f"model.{name}.proj"
        self.num_features = model.num_features
        model.blocks = nn.Identity()
        model.reset_classifier(0)
        self.head_hidden_size = getattr(model, "head_hidden_size", model.num_features)
        self.model = model

    @property
    def tokens(self) -> bool:
        return self.kind != "convmixer"

    @property
    def num_prefix_tokens(self) -> int:
        return getattr(self.model, "num_prefix_tokens", 0) if self.tokens else 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind != "vit":
            return m.stem(x)
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.model, "norm", None)
        return x if norm is None else norm(x)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=True)

    def stem_parameters(self) -> list[nn.Parameter]:
        m = self.model
        if self.kind != "vit":
            return list(m.stem.parameters())
        tokens = [getattr(m, n, None) for n in ("cls_token", "reg_token", "pos_embed")]
        return list(m.patch_embed.parameters()) + [t for t in tokens if t is not None]

    # ------------------------------------------------------------ timm contract
    def pool_width(self, global_pool: str) -> int:
        if self.kind == "convmixer":
            return super().pool_width(global_pool)
        return self.num_features

    def check_global_pool(self, global_pool: Any = None, classifier: bool = False) -> None:
        """As ``Trunk.check_global_pool``, with timm's rules for the wrapped class.

        ConvMixer pools as ``Trunk`` does. ViT and mixers take timm's own pooling names
        and, as timm, a classifier after no pooling (it gives per-token logits); a ViT
        cannot switch to another attention pool or to token pooling without a class token.

        Raises:
            ConfigError: A pooling the wrapped timm model refuses.
        """
        current = self.model.global_pool
        if self.kind == "convmixer":
            pool = current.pool_type if global_pool is None else global_pool
            check_adaptive_pool(pool, classifier)
            return
        if global_pool is None:
            return
        check_pool_name(global_pool, POOLS[self.kind])
        if self.kind != "vit":
            return
        if global_pool == "token" and not self.model.has_class_token:
            raise ConfigError(
                "global_pool='token' needs a class token, which this ViT has not: choose "
                "another pooling such as 'avg'"
            )
        if global_pool in ATTENTION_POOLS and global_pool != current:
            raise ConfigError(
                f"global_pool={global_pool!r} is an attention pool, which only creating the "
                f"model builds: create the model with global_pool={global_pool!r}"
            )

    def set_global_pool(self, global_pool: str) -> None:
        self.model.reset_classifier(0, global_pool)
        self.head_hidden_size = self.pool_width(global_pool)

    def feature_size(self, size: tuple[int, int]) -> tuple[int, int]:
        if self.kind == "vit":
            return tuple(self.model.patch_embed.dynamic_feat_size(tuple(size)))
        if self.kind == "mixer":
            return tuple(self.model.stem.dynamic_feat_size(tuple(size)))
        return super().feature_size(size)

    def format_intermediate(
        self, x: torch.Tensor, size: tuple[int, int], output_fmt: str
    ) -> torch.Tensor:
        if not self.tokens:
            return super().format_intermediate(x, size, output_fmt)
        x = x[:, self.num_prefix_tokens :]
        if output_fmt == "NLC":
            return x
        height, width = self.feature_size(size)
        return x.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()


def _structure(block: nn.Module) -> str:
    """The block's architecture as text, with drop-path rates left out."""
    return re.sub(r"DropPath\([^)]*\)", "Identity()", repr(block))


def split_timm_model(model: nn.Module) -> tuple[TimmTrunk, list[nn.Module], nn.Module]:
    """Splits a timm model into trunk, blocks and classifier, leaving ``model`` intact.

    Raises:
        ConfigError: The model's class is not supported, it has no blocks, or its
            blocks differ in anything but their drop-path rate.
    """
    _kind(model)
    model = copy.deepcopy(model)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ConfigError(
            f"{type(model).__name__} has no sequence of identical `blocks`: from_timm needs one"
        )
    reference = _structure(blocks[0])
    for index, block in enumerate(blocks):
        if _structure(block) != reference:
            raise ConfigError(
                f"block {index} of the {type(model).__name__} differs from block 0 in more "
                "than its drop-path rate: from_timm needs identical blocks"
            )
    head = model.get_classifier()
    blocks = list(blocks)
    return TimmTrunk(model), blocks, head


def timm_family(model: nn.Module, num_templates: int | None = None) -> tuple[Family, nn.Module]:
    """Family from a timm model: its blocks become the first templates.

    Returns the family and the model's classifier (``nn.Identity`` when it has none).
    The family records each block's drop-path rate and BatchNorm statistics, which a
    converted task takes over per layer position.

    Raises:
        ConfigError: See ``split_timm_model``; also blocks whose non-statistics
            buffers differ (one shared copy would change what they compute).
    """
    trunk, blocks, head = split_timm_model(model)
    reference = blocks[0]
    for name, value in reference.named_buffers():
        if is_batchnorm_buffer(reference, name):
            continue
        for index, block in enumerate(blocks):
            if not torch.equal(block.get_buffer(name), value):
                raise ConfigError(
                    f"block {index} has a different buffer {name!r} from block 0: the pool "
                    "shares such buffers, so from_timm cannot convert this model faithfully"
                )
    templates = blocks if num_templates is None else blocks[:num_templates]
    factory = partial(fresh_block_like, copy.deepcopy(reference), trunk.kind)
    pool = TemplatePool(templates, block_factory=factory)
    config = dict(family="timm", architecture=type(model).__name__)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    family = Family(trunk=trunk, pool=pool, config=config)
    family.mean = tuple(cfg.get("mean", family.mean))
    family.std = tuple(cfg.get("std", family.std))
    for key in PREPROCESSING_KEYS:
        if cfg.get(key) is not None:
            setattr(family, key, cfg[key])
    family.drop_path_rates = [block_rate(block) for block in blocks]
    family.layer_stats = [
        {n: b.get_buffer(n).detach().clone() for n in pool.stat_names} for b in blocks
    ]
    return family, head


def timm_family_by_name(architecture: str, timm_kwargs: dict[str, Any] | None = None) -> Family:
    """The family of ``timm.create_model(architecture, **timm_kwargs)``: how loads rebuild it."""
    model = timm.create_model(architecture, pretrained=False, **(timm_kwargs or {}))
    family, _ = timm_family(model)
    family.config = dict(
        family="timm", architecture=architecture, timm_kwargs=dict(timm_kwargs or {})
    )
    return family


def vit_family(
    num_templates: int = 4,
    img_size: int | tuple[int, int] = 32,
    patch_size: int = 4,
    embed_dim: int = 192,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    in_chans: int = 3,
    global_pool: str = "token",
    drop_rate: float = 0.0,
    fc_norm: bool | None = None,
) -> Family:
    """A timm ViT with ``num_templates`` blocks, whose blocks become the pool.

    ``img_size`` is an int for square images or a ``(height, width)`` pair (timm's).
    ``global_pool`` is timm's ViT pooling (``"token"``, ``"avg"``, ``"avgmax"``,
    ``"max"``, ``"map"``, ``"prr"``, or ``""`` for none, where a head gives per-token
    logits as in timm); ``drop_rate`` is dropout on the pooled features before a
    head (timm's). ``fc_norm`` puts the final norm after the pooling (timm's; ``None``:
    for ``"avg"``, ``"avgmax"`` and ``"max"``): a config records it when a later
    ``reset_classifier`` changed the pooling but, as in timm, kept the norm where it was.

    Raises:
        ConfigError: An ``img_size`` that is not a positive int or pair, or not
            divisible by ``patch_size``; an ``embed_dim`` not divisible by
            ``num_heads``, or an unknown ``global_pool``.
    """
    img_size = image_size(img_size)
    # timm's patch embedding would silently drop the pixels past the last whole patch
    check_divisible("img_size", img_size, "patch_size", patch_size)
    check_divisible("embed_dim", embed_dim, "num_heads", num_heads)
    check_pool_name(global_pool, POOLS["vit"])
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=0,
        embed_dim=embed_dim,
        depth=num_templates,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        global_pool=global_pool,
        drop_rate=drop_rate,
        fc_norm=fc_norm,
    )
    family, _ = timm_family(vit)
    family.config = dict(
        family="vit",
        num_templates=num_templates,
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        in_chans=in_chans,
        global_pool=global_pool,
    )
    if drop_rate:
        family.config["drop_rate"] = drop_rate
    if fc_norm is not None:
        family.config["fc_norm"] = fc_norm
    return family
