"""Model options from the user (``--model`` and ``--model-arg``), checked before building.

``check_model_options`` names a wrong option with its accepted range in one
line; ``create_model`` builds through timm and turns what timm or a family still
refuses (an unknown option) into the same kind of error.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
import re
from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

from .errors import ConfigError, ModnetError
from .routing import ROUTE_INITS, ROUTE_KINDS

# option: (kind, low, high); kind "int" or "float"; bounds inclusive, None for open.
NUMERIC = {
    "depth": ("int", 1, None),
    "num_templates": ("int", 1, None),
    "width": ("int", 1, None),
    "exp_ratio": ("float", 1e-9, None),
    "img_size": ("int", 1, None),
    "in_chans": ("int", 1, None),
    "stem_stride": ("int", 1, None),
    "patch_size": ("int", 1, None),
    "embed_dim": ("int", 1, None),
    "num_heads": ("int", 1, None),
    "mlp_ratio": ("float", 1e-9, None),
    "num_classes": ("int", 0, None),
    "drop_rate": ("float", 0.0, 1.0 - 1e-9),
    "drop_path_rate": ("float", 0.0, 1.0 - 1e-9),
}
CHOICES = {
    "route": ROUTE_KINDS,
    "route_init": ROUTE_INITS,
}
BOOLEAN = ("anisotropic",)


def modnet_models() -> list[str]:
    """Every registered ``modnet_*`` model name."""
    return timm.list_models("modnet_*")


def check_model_options(model: str, options: Mapping[str, Any]) -> None:
    """Checks a model name and its options before anything is built.

    Raises:
        ConfigError: Unknown model, or an option of the wrong type or out of range
            (the message names the option, the value and what it accepts).
    """
    known = modnet_models()
    if model not in known:
        raise ConfigError(f"unknown model {model!r}: choose one of {', '.join(known)}")
    for key, value in options.items():
        if key in NUMERIC:
            kind, low, high = NUMERIC[key]
            _check_number(key, value, kind, low, high)
        elif key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(
                f"model option {key}={value!r} is not one of {', '.join(CHOICES[key])}"
            )
        elif key in BOOLEAN and not isinstance(value, bool):
            raise ConfigError(f"model option {key} must be True or False, got {value!r}")
        elif key == "route_options":
            _check_route_options(model, value, options)
    _check_hyper_options(options)
    _check_divisible(model, options)


def _check_divisible(model: str, options: Mapping[str, Any]) -> None:
    """Sizes that must divide each other, an option given or the model's default."""
    value, known = _resolver(model, options)
    pairs = (("embed_dim", "num_heads"), ("img_size", "stem_stride"), ("img_size", "patch_size"))
    for big, small in pairs:
        if not (known(big) and known(small) and (big in options or small in options)):
            continue
        a, b = value(big), value(small)
        if isinstance(a, int) and isinstance(b, int) and b > 0 and a % b:
            given = ", ".join(f"{k}={value(k)}" for k in (big, small) if k in options)
            raise ConfigError(
                f"model option {big}={a} must be divisible by {small}={b} (given: {given}): "
                f"choose {big} as a multiple of {small}"
            )


def _resolver(model: str, options: Mapping[str, Any]):
    """``key -> value``: the option given, else the model's, else its family's default;
    and ``key -> bool``: whether the model's family takes that option."""
    from .factory import MODELS

    family, defaults = MODELS.get(model, (None, {}))
    signature = inspect.signature(family).parameters if family is not None else {}

    def value(key: str) -> Any:
        if key in options:
            return options[key]
        if key in defaults:
            return defaults[key]
        parameter = signature.get(key)
        return None if parameter is None else parameter.default

    def known(key: str) -> bool:
        return family is None or key in signature

    return value, known


def _check_hyper_options(options: Mapping[str, Any]) -> None:
    """The model's own check of the hypernetwork options (``check_hyper_options``)."""
    from .model import ModularNet
    from .route_checks import HYPER_DEFAULTS, check_hyper_options

    route = options.get("route", inspect.signature(ModularNet).parameters["route"].default)
    try:
        check_hyper_options(route, {k: v for k, v in options.items() if k in HYPER_DEFAULTS})
    except ConfigError as error:
        raise ConfigError(f"model option {error}") from None


def _check_route_options(model: str, value: Any, options: Mapping[str, Any]) -> None:
    from .route_checks import check_route_options as check

    if not isinstance(value, Mapping):
        raise ConfigError(
            f"model option route_options must be a dict such as {{'temperature': 0.5}}, "
            f"got {value!r}"
        )
    resolve, _ = _resolver(model, options)
    count = resolve("num_templates")
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        count = None  # a family without a pool size: top_k is checked when it is built
    top_k = value.get("top_k")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        or (count is not None and top_k > count)
    ):  # fmt: skip
        accepted = f"in 1..num_templates={count}" if count else ">= 1"
        raise ConfigError(
            f"model option route_options: top_k must be an integer {accepted} (the templates "
            f"each layer keeps), got {top_k!r}"
        )
    try:
        check(options.get("route", "softmax"), value, count or top_k or 1)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model option route_options: {error}") from None


def check_number_option(key: str, value: Any) -> None:
    """Checks one numeric model option (a key of ``NUMERIC``) for type and range.

    Raises:
        ConfigError: Naming the option, what it accepts and the value.
    """
    _check_number(key, value, *NUMERIC[key])


def _check_number(key: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    # Python, numpy and 0-d tensor numbers alike (what timm.create_model has always taken)
    integral = False
    if not isinstance(value, bool):
        try:
            value, integral = operator.index(value), True
        except TypeError:
            pass
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    tensor = getattr(value, "ndim", None) == 0 and getattr(value, "is_floating_point", bool)()
    if not integral and kind == "float" and (real or tensor):
        value = float(value)
    if kind == "int" and not integral:
        square = (
            " (the data is loaded as square images; a (height, width) pair works with "
            "timm.create_model, not in training)"
            if key == "img_size" and isinstance(value, (list, tuple))
            else ""
        )
        raise ConfigError(f"model option {key} must be an integer, got {value!r}{square}")
    if kind == "float" and not (integral or (isinstance(value, float) and math.isfinite(value))):
        raise ConfigError(f"model option {key} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        accepted = f">= {low:g}" if high is None else f"in [{low:g}, {high:.6g}]"
        if kind == "float" and low and low < 1e-6:
            accepted = "> 0"
        raise ConfigError(f"model option {key} must be {accepted}, got {value!r}")


def create_model(model: str, options: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(model, **options)`` after ``check_model_options``.

    Raises:
        ConfigError: A bad option, including one the model does not know.
    """
    check_model_options(model, options)
    return timm_create(model, options)


def timm_create(model: str, options: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(model, **options)`` for any registered model, an option the
    model does not know, or a value that its construction refuses, turned into a
    one-line ``ConfigError``.

    A failure is the options' fault only if the model builds without them; otherwise
    (a bug in the model itself) it keeps its traceback.
    """
    try:
        return timm.create_model(model, **dict(options))
    except ModnetError:
        raise
    except BUILD_ERRORS as error:
        if isinstance(error, TypeError) and "unexpected keyword argument" in str(error):
            found = re.search(r"argument '(\w+)'", str(error))
            name = found.group(1) if found else str(error)
            raise ConfigError(
                f"unknown model option {name!r} for {model}: check its spelling "
                "(--model-arg KEY=VALUE)"
            ) from None
        if not options or not _builds_without_options(model):
            raise
        raise ConfigError(_refused_message(model, options, error)) from error


# What a model's construction raises for a value it refuses (timm's ``get_act_layer``
# a KeyError for an unknown activation, a family a ValueError or an assertion, ...).
BUILD_ERRORS = (
    KeyError, ValueError, TypeError, AssertionError, AttributeError, IndexError, RuntimeError,
    NotImplementedError,
)  # fmt: skip


def _builds_without_options(model: str) -> bool:
    try:
        timm.create_model(model)
    except Exception:
        return False
    return True


def _refused_message(model: str, options: Mapping[str, Any], error: BaseException) -> str:
    """Names the options the error mentions (every option given if it names none)."""
    text = " ".join(str(error).split())
    named = [
        key
        for key, value in options.items()
        if re.search(rf"\b{re.escape(key)}\b", text)
        or (isinstance(value, str) and value and value in text)
    ] or list(options)
    given = ", ".join(f"{key}={options[key]!r}" for key in named)
    which = "option" if len(named) == 1 else "options"
    if len(text) > 200:
        text = text[:197] + "..."
    return (
        f"{model} cannot be built with the model {which} {given} ({type(error).__name__}: "
        f"{text}): give another value (--model-arg KEY=VALUE)"
    )
