"""The target domain as one more task: a route, head and statistics taken from the sources.

The sources share a label space, so the target starts as a source (its route,
head and norm statistics) or as their average, and only what adaptation is
allowed to train moves from there. The route is always made learnable: a hard
source route becomes a near one-hot softmax route.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..model import ModularNet
from ..routing import HardRoute, HyperRoute, Route, SoftRoute
from .errors import AdaptationError

AVERAGE = "average"
_ONE_HOT_FLOOR = 1e-4  # share of the other templates when a hard route becomes soft


def check_init(
    init: str, sources: Sequence[str], what: str = "init", rules: Sequence[str] = (AVERAGE,)
) -> None:
    """Raises unless ``init`` is one of ``rules`` or a source name."""
    if init not in rules and init not in sources:
        raise AdaptationError(
            f"unknown {what} {init!r}: use {' or '.join(map(repr, rules))} or one of the "
            f"sources {list(sources)}"
        )


def add_target_task(
    model: ModularNet,
    name: str,
    num_classes: int,
    sources: Sequence[str],
    init: str = AVERAGE,
    head_init: str | None = None,
    anisotropic: bool = False,
) -> None:
    """Adds the target task, initialised from a source or from the sources' average.

    Args:
        model: The model holding the source tasks.
        name: The target task's name.
        num_classes: Classes of the target (the sources' label space).
        sources: Source task names.
        init: ``"average"`` or a source name: where the route and the norm
            statistics start.
        head_init: Where the head starts; default: the same as ``init``.
        anisotropic: Give the target one coefficient per block parameter tensor
            (``[L, K, G]``), each starting at its template's share, so every
            tensor of a layer can mix the templates differently.

    Raises:
        AdaptationError: An unknown ``init``, or ``anisotropic`` with sources
            whose routes are hypernetwork routes.
    """
    head_init = head_init or init
    check_init(init, sources)
    check_init(head_init, sources, "head init")
    if init == AVERAGE:
        route = average_route(model, sources)
    else:
        route = learnable_route(model, model.routes[init], init)
    if anisotropic:
        route = anisotropic_route(route, model.pool.num_tensors)
    model.add_task(name, num_classes, route=route)
    picked = sources if init == AVERAGE else [init]
    with torch.no_grad():
        model.norm_stats[name].load_state_dict(mixture_stats(model, picked))
        heads = [model.heads[s] for s in (sources if head_init == AVERAGE else [head_init])]
        for key, value in model.heads[name].state_dict().items():
            value.copy_(torch.stack([h.state_dict()[key] for h in heads]).mean(0))


def learnable_route(model: ModularNet, route: Route, source: str) -> Route:
    """A copy of ``route`` that gradients can move (hard routes become soft)."""
    if isinstance(route, HardRoute):
        return _soft_from_shares(_hard_shares(model, route, source))
    return copy.deepcopy(route)


def anisotropic_route(route: Route, tensors: int) -> SoftRoute:
    """``route`` with one coefficient per block tensor, each equal to its template's.

    The new route computes the same mixture as ``route`` until it trains.
    Already anisotropic routes are returned as a copy.
    """
    if not isinstance(route, SoftRoute):
        raise AdaptationError(
            f"anisotropic adaptation needs soft source routes, got a {type(route).__name__}: "
            "drop --anisotropic"
        )
    if route.anisotropic:
        return copy.deepcopy(route)
    logits = route.logits.detach()
    expanded = logits.unsqueeze(-1).expand(*logits.shape, tensors)
    new = SoftRoute(route.depth, route.num_templates, tensors, route.normalize, init="uniform")
    with torch.no_grad():
        new.logits.copy_(expanded)
    return new.to(logits.device)


def average_route(model: ModularNet, sources: Sequence[str]) -> Route:
    """The sources' routes averaged, as a route of the same kind where that is exact.

    Softmax routes average their coefficients (the logits are their log);
    linear routes average their coefficients; hypernetwork routes average their
    task embeddings; hard routes average their one-hot rows into a softmax route.
    """
    routes = [model.routes[s] for s in sources]
    kinds = {type(r).__name__ + getattr(r, "normalize", "") for r in routes}
    if len(kinds) > 1:
        raise AdaptationError(
            f"the sources {list(sources)} have routes of different kinds ({sorted(kinds)}): "
            "start the target from one of them with init=<source>"
        )
    first = routes[0]
    if isinstance(first, HyperRoute):
        if len({r.num_templates for r in routes}) > 1:
            raise AdaptationError(
                "the sources' hypernetwork routes see different numbers of templates: "
                "start the target from one of them with init=<source>"
            )
        route = copy.deepcopy(first)
        with torch.no_grad():
            route.embedding.copy_(torch.stack([r.embedding for r in routes]).mean(0))
            if route.extra is not None:
                route.extra.copy_(torch.stack([r.extra for r in routes]).mean(0))
        return route
    if isinstance(first, SoftRoute) and first.normalize == "linear":
        count = max(r.num_templates for r in routes)
        padded = [_pad_templates(r.logits.detach(), count) for r in routes]
        return SoftRoute.from_coefficients(torch.stack(padded).mean(0))
    shares = [
        _hard_shares(model, r, s) if isinstance(r, HardRoute) else r.coefficients().detach()
        for r, s in zip(routes, sources, strict=True)
    ]
    count = max(s.shape[1] for s in shares)
    return _soft_from_shares(torch.stack([_pad_templates(s, count) for s in shares]).mean(0))


def _pad_templates(values: torch.Tensor, count: int) -> torch.Tensor:
    missing = count - values.shape[1]
    if missing <= 0:
        return values
    return torch.cat([values, values.new_zeros((values.shape[0], missing, *values.shape[2:]))], 1)


def _hard_shares(model: ModularNet, route: HardRoute, source: str) -> torch.Tensor:
    if route.depth != model.depth:
        raise AdaptationError(
            f"the source {source!r} has a hard route of {route.depth} layers but the model "
            f"has depth {model.depth}: adaptation learns a soft route over every layer, so it "
            "needs sources whose routes use all layers"
        )
    shares = torch.zeros(route.depth, route.num_templates, device=route.indices.device)
    shares[torch.arange(route.depth), route.indices] = 1.0
    return shares


def _soft_from_shares(shares: torch.Tensor) -> SoftRoute:
    depth, count = shares.shape[:2]
    tensors = shares.shape[2] if shares.ndim == 3 else 1
    route = SoftRoute(depth, count, tensors, normalize="softmax", init="uniform")
    with torch.no_grad():
        logits = shares.clamp_min(_ONE_HOT_FLOOR).log()
        route.logits.copy_(logits.reshape(route.logits.shape))
    return route.to(shares.device)


@torch.no_grad()
def mixture_stats(model: ModularNet, sources: Sequence[str]) -> dict[str, torch.Tensor]:
    """Norm statistics of the sources' pooled data: means averaged, variances of the mixture.

    For equally weighted sources the mixture's variance is the mean of
    ``var_s + mean_s**2`` minus the squared mean of the means.
    """
    states = [model.norm_stats[s].state_dict() for s in sources]
    mixed = {}
    for key, value in states[0].items():
        stacked = torch.stack([state[key] for state in states])
        if key.endswith("running_var"):
            means = torch.stack([state[key[: -len("var")] + "mean"] for state in states])
            mixed[key] = (stacked + means.pow(2)).mean(0) - means.mean(0).pow(2)
        elif value.dtype.is_floating_point:
            mixed[key] = stacked.mean(0)
        else:
            mixed[key] = stacked.max(0).values
    return mixed
