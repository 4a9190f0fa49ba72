"""Checks of routes and route options against a model, before anything is kept.

``ModularNet.add_task``, ``set_route`` and per-call route overrides run a route through
``coerce_route``; ``create_model`` and the command line check route and hypernetwork
options with ``check_route_options`` and ``check_hyper_options``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError
from .routing import NORMALIZATIONS, HardRoute, HyperRoute, Route, SoftRoute, check_size

if TYPE_CHECKING:
    from .model import ModularNet


def check_route_options(route: str, options: Mapping[str, Any], count: int) -> None:
    """Checks ``route_options`` (``temperature``, ``top_k``, ``straight_through``) by
    configuring a one-layer soft route over ``count`` templates with them.

    Raises:
        ValueError: Options for a hard or hyper route, a ``normalize`` key, or an
            option ``SoftRoute.configured`` refuses.
    """
    if route in ("hard", "hyper") or "normalize" in options:
        raise ValueError(
            f"route_options {dict(options)} need route='softmax' or 'sparsemax' (got "
            f"{route!r}) and no 'normalize' key: give the normalisation as route=..."
        )
    SoftRoute(1, count, normalize=route, init="uniform").configured(**options)


# The hypernetwork's options (``route="hyper"``) and their defaults: with another
# route, any other value would be saved and do nothing.
HYPER_DEFAULTS: dict[str, Any] = {"hyper_dim": 8, "hyper_hidden": 0, "hyper_normalize": "linear"}


def check_hyper_options(route: str, options: Mapping[str, Any]) -> None:
    """Checks hypernetwork options: ``create_model``'s and the command line's one check.

    Args:
        route: The model's route kind.
        options: Some of ``hyper_dim``, ``hyper_hidden`` and ``hyper_normalize``
            (keys of ``HYPER_DEFAULTS``).

    Raises:
        ConfigError: ``hyper_dim`` not a whole number >= 1, ``hyper_hidden`` not one
            >= 0, an unknown ``hyper_normalize``, or a value other than the default
            when ``route`` is not ``"hyper"`` (it would do nothing).
    """
    for key, value in options.items():
        if key == "hyper_normalize":
            if not isinstance(value, str) or value not in NORMALIZATIONS:
                raise ConfigError(f"{key}={value!r} is not one of {', '.join(NORMALIZATIONS)}")
        elif key == "hyper_dim":
            check_size(key, value, 1, " (the size of each task's embedding)")
        else:
            check_size(key, value, 0, " (the hypernetwork's hidden width, 0 for a linear map)")
    if route == "hyper":
        return
    for key, value in options.items():
        if value != HYPER_DEFAULTS[key]:
            raise ConfigError(
                f"{key}={value!r} only applies to route=hyper, and the route is {route}: "
                f"set route=hyper or leave {key} out"
            )


def coerce_route(model: ModularNet, route: Any, task: str) -> Route:
    """A route of the model's own: every input is copied, never shared."""
    count = model.pool.num_templates
    if isinstance(route, Route):
        new = copy.deepcopy(route)
    elif torch.is_tensor(route) and route.dtype.is_floating_point:
        new = SoftRoute.from_coefficients(route.detach())
    elif (
        route is None
        or isinstance(route, (str, bytes, Mapping, int, float))
        or (torch.is_tensor(route) and route.dtype == torch.bool)
        or (not torch.is_tensor(route) and any(isinstance(i, (bool, float)) for i in route))
    ):  # not silently rounded or read as 0/1: a hard route is integer indices
        raise ValueError(
            f"the route for task {task!r} must be a list of integer template indices, a "
            f"float coefficient tensor [L, K] or [L, K, G], or a Route; got {route!r}"
        )
    elif torch.is_tensor(route) and route.ndim != 1:
        raise ValueError(
            f"an integer route tensor for task {task!r} must be 1-D template indices, got "
            f"shape {tuple(route.shape)}: pass coefficients [L, K] as a float tensor "
            "(e.g. route.float() for one-hot rows)"
        )
    else:
        new = HardRoute(route, count)
    if new.num_templates > count:
        raise ValueError(
            f"the route for task {task!r} uses {new.num_templates} templates but the "
            f"pool has {count}: grow the pool with model.grow(...) first"
        )
    covered = list(itertools.accumulate(c.num_templates for c in model.pool.chunks))
    if new.num_templates not in covered:  # a route made before growth covers whole chunks
        raise ValueError(
            f"the route for task {task!r} covers {new.num_templates} templates, but the "
            f"pool's templates come in chunks covering {covered}: give coefficients for "
            f"{count} templates"
        )
    if isinstance(new, HardRoute):
        check_hard_route(model, new, task)
    elif isinstance(new, (SoftRoute, HyperRoute)):
        check_coefficient_route(model, new, task)
    return new


def check_coefficient_route(model: ModularNet, route: SoftRoute | HyperRoute, task: str) -> None:
    """A soft or hyper route's depth and coefficients per (layer, template).

    Raises:
        ValueError: The route has another depth than the model; a soft route's
            anisotropic coefficients are not one per block tensor; a hyper route
            on a model without a hypernetwork, or whose ``embed_dim``,
            ``hyper_templates`` or ``num_tensors`` differ from the hypernetwork's.
    """
    hyper = isinstance(route, HyperRoute)
    if hyper:
        check_hyper_route(model, route, task)
    if route.depth != model.depth:
        fix = f"build it with depth={model.depth}"
        if not hyper:
            fix = "give one row of coefficients per layer"
        raise ValueError(
            f"the {'hyper' if hyper else 'soft'} route for task {task!r} has {route.depth} "
            f"layers but the model has depth {model.depth}: {fix}"
        )
    if hyper and route.num_tensors != model.hypernet.num_tensors:
        wanted = model.hypernet.num_tensors
        gives = f"{wanted} coefficients per (layer, template), one per block tensor"
        if wanted == 1:
            gives = "one coefficient per (layer, template), the model being isotropic"
        raise ValueError(
            f"the hyper route for task {task!r} has num_tensors={route.num_tensors} but "
            f"the model's hypernetwork gives {gives}: build it with num_tensors={wanted}"
        )
    if not hyper and route.anisotropic and route.logits.shape[2] != model.pool.num_tensors:
        raise ValueError(
            f"anisotropic coefficients need {model.pool.num_tensors} entries per "
            f"(layer, template), one per block tensor; got {route.logits.shape[2]}"
        )
    check_finite_route(route, task)


def check_finite_route(route: SoftRoute | HyperRoute, task: str) -> None:
    """A route whose coefficients hold nan or inf would turn every logit of the task
    into nan. A soft route is judged by the coefficients it gives (with softmax or
    sparsemax a ``-inf`` logit leaves a template out, as top-k routing does, as long
    as each layer keeps one); a hyper route by its own tensors.

    Raises:
        ValueError: Naming the task and the fix.
    """
    if isinstance(route, SoftRoute):
        was_training = route.training
        route.eval()  # no Gumbel noise
        try:
            with torch.no_grad():
                values = [route.coefficients()]
        finally:
            route.train(was_training)
    else:
        values = [v for v in route.state_dict().values() if v.is_floating_point()]
    if not all(bool(v.isfinite().all()) for v in values):
        raise ValueError(
            f"the route for task {task!r} gives non-finite coefficients (nan or inf), which "
            "make every output of the task nan: give finite logits or coefficients (a "
            "softmax or sparsemax route takes -inf to leave a template out, as long as "
            "each layer keeps one)"
        )


def check_hyper_route(model: ModularNet, route: HyperRoute, task: str) -> None:
    """A hyper route must fit the model's hypernetwork (its input and its output)."""
    if model.hypernet is None:
        raise ValueError(
            f"the route for task {task!r} is a HyperRoute, but this model's routes are "
            f"{model.route_kind} and it has no hypernetwork to run it: build the model "
            "with route='hyper', or give coefficients [L, K] or a SoftRoute"
        )
    embed_dim, wanted = route.embedding.shape[0], model.hypernet.embed_dim
    if embed_dim != wanted:
        raise ValueError(
            f"the hyper route for task {task!r} has embed_dim={embed_dim} but the model's "
            f"hypernetwork takes embeddings of size {wanted} (hyper_dim): build it with "
            f"embed_dim={wanted}"
        )
    if route.hyper_templates != model.hypernet.num_templates:
        wanted = model.hypernet.num_templates
        raise ValueError(
            f"the hyper route for task {task!r} has hyper_templates={route.hyper_templates} "
            f"but the model's hypernetwork gives coefficients for {wanted} templates: "
            f"build it with hyper_templates={wanted}"
        )


def check_hard_route(model: ModularNet, route: HardRoute, task: str) -> None:
    """A hard route's length (1 to the model's depth) and its template indices.

    Raises:
        ValueError: Too many or no entries, or an index outside the route's templates.
    """
    if not 1 <= route.depth <= model.depth:
        raise ValueError(
            f"the hard route for task {task!r} has {route.depth} entries: it needs "
            f"between 1 and {model.depth} (the model's depth; norm statistics exist "
            f"for {model.depth} layer positions)"
        )
    for layer, index in enumerate(route.indices.tolist()):
        if not 0 <= index < route.num_templates:
            raise ValueError(
                f"route index {index} at layer {layer} of task {task!r} is out of range: "
                f"the pool has {route.num_templates} templates (0..{route.num_templates - 1})"
            )
