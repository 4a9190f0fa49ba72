"""timm registration of modnet models (default cfgs, features), and ``from_timm`` conversion."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import pretrained_cfg_for_features
from torch import nn

from .errors import ConfigError
from .families import conv_family, timm_family, timm_family_by_name, vit_family
from .families.base import Family
from .features import ModnetFeatures, take_indices
from .model import ModularNet
from .route_checks import HYPER_DEFAULTS
from .routing import HardRoute

_MODEL_OPTIONS = (
    "route",
    "anisotropic",
    "route_init",
    "hyper_dim",
    "hyper_hidden",
    "hyper_normalize",
    "drop_path_rate",
    "route_options",
)

# Every registered model: its family and the options it sets (the family's own
# defaults fill the rest); ``modnet.options`` checks user options against both.
MODELS: dict[str, tuple[Callable[..., Family], dict[str, Any]]] = {
    "modnet_conv_tiny": (
        conv_family,
        dict(depth=16, num_templates=4, width=40, exp_ratio=6.0, img_size=32),
    ),
    "modnet_conv_small": (
        conv_family,
        dict(depth=16, num_templates=8, width=64, exp_ratio=6.0, img_size=64, stem_stride=4),
    ),
    "modnet_vit_tiny": (
        vit_family,
        dict(depth=12, num_templates=4, img_size=32, patch_size=4, embed_dim=192, num_heads=3),
    ),
    "modnet_vit_small": (
        vit_family,
        dict(depth=12, num_templates=6, img_size=64, patch_size=8, embed_dim=384, num_heads=6),
    ),
}

# Layer positions a features_only model returns by default: the last four (all of a
# shallower model).
DEFAULT_FEATURE_LAYERS = 4


def _cfg(size: int, stride: int, first_conv: str, **overrides: Any) -> dict[str, Any]:
    return dict(
        input_size=(3, size, size),
        pool_size=(size // stride, size // stride),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bilinear",
        crop_pct=1.0,
        fixed_input_size=True,  # a model takes the img_size it was built for, and refuses others
        num_classes=0,  # no pretrained head: a task's classes are chosen when it is added
        first_conv=first_conv,
        classifier="heads.default",
        license="apache-2.0",
        **overrides,
    )


default_cfgs = generate_default_cfgs(
    {
        "modnet_conv_tiny": _cfg(32, 2, "trunk.stem.0"),
        "modnet_conv_small": _cfg(64, 4, "trunk.stem.0"),
        "modnet_vit_tiny": _cfg(32, 4, "trunk.model.patch_embed.proj"),
        "modnet_vit_small": _cfg(64, 8, "trunk.model.patch_embed.proj"),
    }
)


def _construct(
    family_fn: Callable[..., Family], defaults: Mapping[str, Any], variant: str, **kwargs: Any
) -> ModularNet:
    device = kwargs.pop("device", None)
    dtype = kwargs.pop("dtype", None)
    options = {**defaults, **kwargs}
    depth = options.pop("depth")
    tasks = options.pop("tasks", None)
    num_classes = options.pop("num_classes", None)
    if tasks is None:
        tasks = {"default": num_classes} if num_classes is not None else {}
    model_options = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
    _check_family_options(variant, family_fn, options)
    family = family_fn(**options)
    # add_task refuses a head after no pooling ("") for each task, before the first forward
    model = ModularNet(family, depth=depth, tasks=tasks, **model_options)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def _check_family_options(
    variant: str, family_fn: Callable[..., Family], options: Mapping[str, Any]
) -> None:
    """Refuses an option neither the family nor the model takes, as the CLI does (a
    ``TypeError`` from deep inside timm's builder before)."""
    parameters = inspect.signature(family_fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [key for key in options if key not in parameters]
    if unknown:
        valid = sorted({*parameters, "depth", "tasks", "num_classes", *_MODEL_OPTIONS})
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown model option {unknown[0]!r} for {variant}{hint}: check its spelling "
            f"(--model-arg KEY=VALUE); it takes {', '.join(valid)}"
        )


# Numeric options whose family or model checks them itself, with its own messages.
_CHECKED_WHERE_USED = ("img_size", "num_heads", "patch_size", "stem_stride", "num_classes", "depth")


def _check_sizes(kwargs: Mapping[str, Any]) -> None:
    """The command line's type and range checks of numeric model options
    (``options.NUMERIC``), for ``timm.create_model`` too: ``width=0``,
    ``embed_dim=0`` or ``exp_ratio=0`` used to fail deep inside timm's builder, or
    build a model of empty layers. Per-layer drop-path rates (a list, tuple or array)
    are checked where they are used."""
    from .options import NUMERIC, check_number_option

    for key, value in kwargs.items():
        per_layer = isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) > 0
        if key in NUMERIC and key not in _CHECKED_WHERE_USED and not per_layer:
            check_number_option(key, value)


def _create(
    variant: str,
    family_fn: Callable[..., Family],
    defaults: Mapping[str, Any],
    pretrained: bool,
    kwargs: dict[str, Any],
) -> nn.Module:
    """Builds through timm's ``build_model_with_cfg`` (default cfg, ``features_only``).

    ``num_classes`` makes one task named ``"default"`` (0: no head, the forward
    returns pooled features); ``tasks={name: classes}`` makes several; neither
    makes a model without tasks, to which ``add_task`` adds them.

    Raises:
        ConfigError: Pretrained weights, both ``tasks`` and ``num_classes``, an unknown
            option, a ``global_pool`` the family does not take (``""`` only
            without heads), or ``out_indices`` that do not fit the depth.
    """
    if pretrained:
        raise ConfigError(
            "modnet models have no pretrained weights to download: create with "
            "pretrained=False and load a checkpoint, or convert one with modnet.from_timm"
        )
    if kwargs.get("tasks") is not None and kwargs.get("num_classes") is not None:
        raise ConfigError("pass either tasks={name: classes} or num_classes, not both")
    _check_sizes(kwargs)
    if kwargs.get("features_only") and kwargs.get("tasks") is None:
        kwargs.setdefault("num_classes", 0)  # a feature extractor needs a task's route
    out_indices = DEFAULT_FEATURE_LAYERS
    depth = kwargs.get("depth", defaults["depth"])
    if isinstance(depth, int) and depth >= 1:  # else the model refuses the depth itself
        out_indices = min(depth, DEFAULT_FEATURE_LAYERS)
        if kwargs.get("features_only") and "out_indices" in kwargs:
            take_indices(depth, kwargs["out_indices"], "out_indices")
    # timm fills num_classes from the default cfg; only a caller's own value makes a task.
    kwargs_filter = () if kwargs.get("num_classes") is not None else ("num_classes",)
    model = build_model_with_cfg(
        partial(_construct, family_fn, defaults, variant),
        variant,
        pretrained=False,
        feature_cfg=dict(out_indices=out_indices, feature_cls=ModnetFeatures),
        kwargs_filter=kwargs_filter,
        **kwargs,
    )
    if isinstance(getattr(model, "model", None), ModularNet):  # a features_only wrapper
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(
            model.model.pretrained_cfg
        )
    return model


FAMILIES = {"conv": conv_family, "vit": vit_family}


def unbuildable_reason(config: Mapping[str, Any]) -> str | None:
    """Why ``build_model`` cannot rebuild a model of ``config``, or ``None`` when it can:
    a model ``from_timm`` converted without the ``timm.create_model`` arguments of it."""
    if config.get("family") != "timm" or config.get("timm_kwargs") is not None:
        return None
    architecture = config.get("architecture")
    known = isinstance(architecture, str) and timm.is_model(architecture)
    name = architecture if known else "<timm model name>"
    return (
        f"it was converted from a {architecture} that timm.create_model cannot recreate by "
        f"name; convert it with modnet.from_timm({name!r}, **kwargs), kwargs being the "
        "timm.create_model arguments it was made with, to make it loadable"
    )


def build_model(config: Mapping[str, Any]) -> ModularNet:
    """Rebuilds a model (without tasks) from ``model.config``: how checkpoints load.

    Raises:
        ConfigError: An unknown family, or a converted timm model whose architecture
            cannot be recreated from a registered name.
    """
    options = dict(config)
    family_name = options.pop("family", None)
    depth = options.pop("depth")
    model_options = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
    if model_options.get("route", "softmax") != "hyper":
        # a model saved while other routes still took hypernetwork options (they did nothing)
        for key in HYPER_DEFAULTS:
            model_options.pop(key, None)
    if family_name == "timm":
        reason = unbuildable_reason(config)
        if reason:
            raise ConfigError(f"cannot rebuild this model: {reason}")
        family = timm_family_by_name(options["architecture"], options["timm_kwargs"])
        if options.get("global_pool") is not None:  # set by reset_classifier after conversion
            family.trunk.set_global_pool(options["global_pool"])
    elif family_name in FAMILIES:
        family = FAMILIES[family_name](**options)
    else:
        raise ConfigError(
            f"cannot rebuild a model of family {family_name!r}: saved models can be rebuilt "
            f"for the families {sorted([*FAMILIES, 'timm'])}"
        )
    return ModularNet(family, depth=depth, **model_options)


@register_model
def modnet_conv_tiny(pretrained: bool = False, **kwargs: Any) -> ModularNet:
    """Inverted residuals, 32x32 input, 16 layers at 16x16x40 from 4 templates."""
    return _create("modnet_conv_tiny", *MODELS["modnet_conv_tiny"], pretrained, kwargs)


@register_model
def modnet_conv_small(pretrained: bool = False, **kwargs: Any) -> ModularNet:
    """Inverted residuals, 64x64 input, 16 layers at 16x16x64 from 8 templates."""
    return _create("modnet_conv_small", *MODELS["modnet_conv_small"], pretrained, kwargs)


@register_model
def modnet_vit_tiny(pretrained: bool = False, **kwargs: Any) -> ModularNet:
    """ViT blocks (dim 192, 3 heads), 32x32 input in 4x4 patches, 12 layers from 4 templates."""
    return _create("modnet_vit_tiny", *MODELS["modnet_vit_tiny"], pretrained, kwargs)


@register_model
def modnet_vit_small(pretrained: bool = False, **kwargs: Any) -> ModularNet:
    """ViT blocks (dim 384, 6 heads), 64x64 input in 8x8 patches, 12 layers from 6 templates."""
    return _create("modnet_vit_small", *MODELS["modnet_vit_small"], pretrained, kwargs)


def _recreates(model: nn.Module, architecture: str, timm_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``timm.create_model(architecture, **timm_kwargs)`` has ``model``'s architecture."""
    try:
        rebuilt = timm.create_model(architecture, pretrained=False, **timm_kwargs)
    except Exception:  # an unknown name or arguments: not rebuildable, said at load time
        return False
    return repr(rebuilt) == repr(model) and _structure(rebuilt) == _structure(model)


# set on a built model without changing what it is
_STATE_FLAGS = frozenset({"training", "grad_checkpointing"})


def _structure(model: nn.Module) -> tuple[list, dict[str, tuple[int, ...]]]:
    """What a module's ``repr`` leaves out: every submodule's class and plain settings
    (``dynamic_img_size``, a patch embedding's ``img_size``, ...) and the shape of every
    tensor of its state (``pos_embed``, ``reg_token``)."""
    plain = (bool, int, float, str, tuple, type(None))
    modules = [
        (
            name,
            type(module),
            {
                key: value
                for key, value in vars(module).items()
                if not key.startswith("_") and key not in _STATE_FLAGS and isinstance(value, plain)
            },
        )
        for name, module in model.named_modules()
    ]
    return modules, {key: tuple(value.shape) for key, value in model.state_dict().items()}


def from_timm(
    model: nn.Module | str, task: str = "default", route: str = "hard", **timm_kwargs: Any
) -> ModularNet:
    """Converts a timm model with identical blocks into a ``ModularNet``.

    Every block becomes one template and the task gets the identity route, so the
    result computes exactly what the timm model computes: the same logits in eval
    mode, and in training mode the same outputs under the same seed (each block's
    drop-path rate stays with its layer position; dropout and BatchNorm run as in
    timm, BatchNorm statistics are taken over per layer). The timm model is not
    modified.

    Supported: timm's ``VisionTransformer`` (``vit_*``, ``deit3_*``, ...),
    ``MlpMixer`` (``mixer_*``, ``resmlp_*``, ``gmlp_*``) and ``ConvMixer``
    (``convmixer_*``), exactly those classes.

    Args:
        model: A timm model, or a timm model name created with ``timm_kwargs``.
        task: Name of the task that the model's classifier becomes.
        route: Kind of route for tasks added later (see ``ModularNet``); the
            converted task itself always gets the identity hard route.
        **timm_kwargs: Arguments of ``timm.create_model``: with a name, used to
            create it; with a model, how it was created (checked). Together with
            the name they are stored in ``config``, so saved models load again.

    Returns:
        The converted model, on the timm model's device and dtype.

    Raises:
        ConfigError: An unsupported class, blocks that differ in anything but their
            drop-path rate, or other parts that cannot be converted faithfully.
    """
    if isinstance(model, str):
        architecture = model
        model = timm.create_model(architecture, **timm_kwargs)
        recreatable = True
    else:
        architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        recreatable = architecture is not None and _recreates(model, architecture, timm_kwargs)
    family, head = timm_family(model)
    rates = family.drop_path_rates
    net = ModularNet(
        family,
        depth=family.pool.num_templates,
        route=route,
        drop_path_rate=rates if any(rates) else 0.0,
    )
    net.config.update(
        architecture=architecture or type(model).__name__,
        timm_kwargs={k: v for k, v in timm_kwargs.items() if k != "pretrained"}
        if recreatable
        else None,
    )
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    net.add_task(task, num_classes, route=HardRoute(range(net.depth), net.depth))
    with torch.no_grad():
        if num_classes:
            net.heads[task].load_state_dict(head.state_dict())
        stats = net.norm_stats[task]
        for layer, values in enumerate(family.layer_stats):
            for name, value in stats.layer(layer).items():
                value.copy_(values[name])
        for name, value in stats.trunk().items():
            value.copy_(net.trunk.get_buffer(name))
    reference = next(model.parameters())
    return net.to(device=reference.device, dtype=reference.dtype).train(model.training)
