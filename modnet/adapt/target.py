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
            tensor of a layer can mix the templates differently. Without it the
            target's route is anisotropic only when its start is (``init`` an
            anisotropic source, or every source anisotropic: see
            ``average_route``).

    Raises:
        AdaptationError: An unknown ``init``, ``anisotropic`` with sources whose
            routes are hypernetwork routes, or sources whose routes cannot be
            averaged (see ``average_route``).
    """
    head_init = head_init or init
    check_init(init, sources)
    check_init(head_init, sources, "head init")
    if init == AVERAGE:
        route = average_route(model, sources, anisotropic)
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


def average_route(model: ModularNet, sources: Sequence[str], anisotropic: bool = False) -> Route:
    """The sources' routes averaged, as a route of the same kind where that is exact.

    Softmax, sparsemax and hard routes (which may be mixed) average their
    template shares (hard routes: one-hot rows) into a softmax route whose
    logits are the log of the mean share; linear routes average their
    coefficients into a linear route; hypernetwork routes average their task
    embeddings. Sources that see fewer templates (made before the pool grew)
    count 0 for the newer ones.

    Isotropic (``[L, K]``) and anisotropic (``[L, K, G]``: one coefficient per
    block parameter tensor) soft routes may be mixed. The average is
    anisotropic when ``anisotropic`` is asked or every source is anisotropic;
    isotropic sources then count their layer's share for every tensor
    (``[L, K] -> [L, K, G]``, exact). Otherwise it is isotropic, and an
    anisotropic source counts its per-layer template shares, the mean over its
    tensors (``[L, K, G] -> [L, K]``, as ``modnet.plot.route_matrix`` reads it).

    Args:
        model: The model holding the source tasks.
        sources: Source task names.
        anisotropic: Average into ``[L, K, G]`` coefficients, ``G`` the pool's
            block tensors, even when some (or all) sources are isotropic.

    Returns:
        A new route: a ``HyperRoute`` for hypernetwork sources, else a
        ``SoftRoute`` of logits ``[L, K]`` or ``[L, K, G]`` with ``K`` the most
        templates any source sees.

    Raises:
        AdaptationError: Sources whose routes cannot be averaged: hypernetwork or
            linear routes together with other kinds, hypernetwork routes that see
            different numbers of templates, or a hard route that skips layers.
    """
    routes = [model.routes[s] for s in sources]
    families = {_family(r) for r in routes}
    if len(families) > 1:
        kinds = sorted({_kind(r) for r in routes})
        raise AdaptationError(
            f"cannot average the routes of the sources {list(sources)}: they are of kinds "
            f"{kinds}, and only softmax, sparsemax and hard routes average together; start "
            "the target from one source (--init SOURCE) or name sources of one kind (--sources)"
        )
    first = routes[0]
    if isinstance(first, HyperRoute):
        if len({r.num_templates for r in routes}) > 1:
            raise AdaptationError(
                "the sources' hypernetwork routes see different numbers of templates: "
                "start the target from one of them (--init SOURCE) or name sources that "
                "see the same templates (--sources)"
            )
        route = copy.deepcopy(first)
        with torch.no_grad():
            route.embedding.copy_(torch.stack([r.embedding for r in routes]).mean(0))
            if route.extra is not None:
                route.extra.copy_(torch.stack([r.extra for r in routes]).mean(0))
        return route
    every = all(isinstance(r, SoftRoute) and r.anisotropic for r in routes)
    tensors = model.pool.num_tensors if anisotropic or every else 1
    if isinstance(first, SoftRoute) and first.normalize == "linear":
        values = [_fit_tensors(r.logits.detach(), tensors) for r in routes]
    else:
        values = [
            _fit_tensors(
                _hard_shares(model, r, s)
                if isinstance(r, HardRoute)
                else r.coefficients().detach(),
                tensors,
            )
            for r, s in zip(routes, sources, strict=True)
        ]
    count = max(v.shape[1] for v in values)
    mean = torch.stack([_pad_templates(v, count) for v in values]).mean(0)
    if isinstance(first, SoftRoute) and first.normalize == "linear":
        return SoftRoute.from_coefficients(mean)
    return _soft_from_shares(mean)


def _family(route: Route) -> str:
    """What ``average_route`` averages a route as: shares, linear coefficients or embeddings."""
    if isinstance(route, HyperRoute):
        return "hyper"
    if isinstance(route, SoftRoute) and route.normalize == "linear":
        return "linear"
    return "shares"


def _kind(route: Route) -> str:
    if isinstance(route, SoftRoute):
        return route.normalize
    return route.spec().get("kind", type(route).__name__)


def _fit_tensors(values: torch.Tensor, tensors: int) -> torch.Tensor:
    """``[L, K]`` or ``[L, K, G]`` coefficients as ``[L, K]`` (``tensors`` 1) or ``[L, K, G]``.

    Isotropic values are repeated over the tensors; anisotropic ones are averaged
    over them.
    """
    if tensors == 1:
        return values.mean(-1) if values.ndim == 3 else values
    if values.ndim == 2:
        return values.unsqueeze(-1).expand(*values.shape, tensors)
    if values.shape[2] != tensors:
        raise AdaptationError(
            f"a source route has {values.shape[2]} coefficients per (layer, template) but "
            f"the pool's blocks have {tensors} tensors: start the target from one source "
            "(--init SOURCE)"
        )
    return values


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
