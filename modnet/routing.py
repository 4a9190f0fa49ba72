"""Routes: for every layer of a task, which templates it uses and with what weights.

A route resolves, once per forward, to a ``RoutePlan``: either template indices (a
hard route: plain block order, repeats and skips allowed) or a coefficient tensor
(a soft route, ``[L, K]`` or anisotropic ``[L, K, G]`` with one coefficient per
parameter tensor). Routes are ordinary modules of the model and inputs of its
forward pass; nothing about a task is stored as hidden mutable state.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .errors import ConfigError

# What ``ModularNet(route=...)`` builds: soft routes by their normalisation, a
# hypernetwork-generated route, or a hard route (one template per layer).
ROUTE_KINDS = ("softmax", "linear", "sparsemax", "hyper", "hard")
# How a soft route's logits start (``SoftRoute(init=...)``, ``create_model(route_init=...)``).
ROUTE_INITS = ("random", "uniform", "cyclic")
NORMALIZATIONS = ("softmax", "linear", "sparsemax")
STRAIGHT_THROUGH = ("argmax", "gumbel")
# Keys of ``SoftRoute.options()``: what ``SoftRoute.configured`` and ``route_options`` accept.
ROUTE_OPTIONS = ("normalize", "temperature", "top_k", "straight_through")


@dataclass(frozen=True)
class RoutePlan:
    """What one task's route resolves to for a single forward pass."""

    indices: tuple[int, ...] | None = None
    index_tensor: torch.Tensor | None = None
    coefficients: torch.Tensor | None = None

    @property
    def depth(self) -> int:
        if self.indices is not None:
            return len(self.indices)
        if self.index_tensor is not None:
            return self.index_tensor.shape[0]
        return self.coefficients.shape[0]

    def template_indices(self, device: torch.device) -> torch.Tensor:
        """A hard route's template per layer as a tensor ``[depth]`` of int64."""
        if self.index_tensor is not None:
            return self.index_tensor
        return torch.tensor(self.indices, device=device)


class Route(nn.Module):
    """Base class. ``num_templates`` is how many pool templates the route can use."""

    num_templates: int

    def plan(self, hypernet: HyperNetwork | None = None) -> RoutePlan:
        raise NotImplementedError

    @property
    def depth(self) -> int:
        raise NotImplementedError

    def spec(self) -> dict:
        """Structure (not values) of the route: enough to rebuild it before loading weights."""
        raise NotImplementedError


class HardRoute(Route):
    """An explicit block order: ``indices[l]`` is the template run at layer ``l``.

    Runs exactly like a plain network: every layer uses a view of one template.
    Under ``torch.compile`` the order is read from a buffer, so replacing the
    route's values does not recompile.
    """

    def __init__(self, indices: Sequence[int] | torch.Tensor, num_templates: int):
        super().__init__()
        # A copy, never a view of the caller's tensor: routes own their state.
        values = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices)
        values = values.detach().to(device="cpu", dtype=torch.long).flatten().clone()
        self.num_templates = num_templates
        self.register_buffer("indices", values)
        self._indices = tuple(values.tolist())

    @property
    def depth(self) -> int:
        return len(self._indices)

    @torch.no_grad()
    def assign(self, other: HardRoute) -> None:
        """Takes ``other``'s order in place: a compiled model sees new values, same graph."""
        self.indices.copy_(other.indices)
        self._indices = tuple(other._indices)
        self.num_templates = other.num_templates

    def plan(self, hypernet: HyperNetwork | None = None) -> RoutePlan:
        if torch.compiler.is_compiling():
            return RoutePlan(index_tensor=self.indices)
        return RoutePlan(indices=self._indices)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "indices"
        if key in state_dict:  # checked first: a refused load leaves the route as it was
            check_loaded_indices(state_dict[key], self.num_templates, key)
        if key in state_dict and state_dict[key].shape != self.indices.shape:
            self.indices = torch.empty_like(state_dict[key], device=self.indices.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._indices = tuple(self.indices.tolist())

    def extra_repr(self) -> str:
        return f"indices={list(self._indices)}"

    def spec(self) -> dict:
        return {"kind": "hard", "depth": self.depth, "num_templates": self.num_templates}


def check_loaded_indices(value: Any, num_templates: int | None, key: str) -> None:
    """A hard route's ``indices`` from a state dict: 1-D integers in ``[0, num_templates)``.

    ``ModularNet`` passes ``num_templates=None`` and runs ``check_hard_route`` for the
    range and the length, as ``set_route`` does.

    Why: loading copies them as they are, and an impossible order otherwise fails
    only at the next forward, as an ``IndexError`` far from its cause.

    Raises:
        ConfigError: Naming ``key``, what is wrong and what the route accepts.
    """
    if (
        not torch.is_tensor(value)
        or value.ndim != 1
        or value.dtype == torch.bool
        or value.dtype.is_floating_point
        or value.dtype.is_complex
    ):
        got = type(value).__name__
        if torch.is_tensor(value):
            got = f"dtype {value.dtype} and shape {tuple(value.shape)}"
        raise ConfigError(
            f"{key} in the state dict must be 1-D integer template indices, got {got}: "
            "load a state dict saved from a model with this hard route"
        )
    for layer, index in enumerate(value.tolist() if num_templates is not None else ()):
        if not 0 <= index < num_templates:
            raise ConfigError(
                f"{key} in the state dict has template {index} at layer {layer}, but the "
                f"route uses {num_templates} templates (0..{num_templates - 1}): load a "
                "state dict saved from a model with the same pool"
            )


class SoftRoute(Route):
    """Learned per-(layer, template) logits, optionally per parameter tensor.

    Coefficients are ``normalize(logits / temperature)`` over the templates, with
    only the ``top_k`` largest logits of each layer kept when ``top_k`` is set, and
    a one-hot forward when ``straight_through`` is set. Every variant resolves to
    an ordinary ``[L, K]`` (or ``[L, K, G]``) coefficient tensor.

    Args:
        depth: Number of layers L.
        num_templates: Templates K the route mixes.
        num_tensors: 1 for one coefficient per (layer, template); the block's number
            of parameter tensors G for anisotropic routes.
        normalize: ``"softmax"`` (convex mixing, the compositional-models default),
            ``"sparsemax"`` (convex and sparse: Martins & Astudillo 2016, "From
            softmax to sparsemax") or ``"linear"`` (raw coefficients, as in
            task-vector arithmetic).
        init: ``"random"`` (small noise, breaks symmetry between layers),
            ``"uniform"`` or ``"cyclic"`` (layer l prefers template l mod K).
        generator: Random generator of the ``"random"`` initialisation.
        temperature: Logits are divided by it before normalising (> 0): below 1
            sharpens the mixture, above 1 smooths it. Softmax and sparsemax only.
        top_k: Keep only the k largest logits of each layer (the others get
            coefficient 0 and no gradient). Softmax and sparsemax only.
        straight_through: ``"argmax"``: the forward pass runs the single template
            with the largest coefficient (a one-hot row), gradients are those of the
            soft coefficients (Bengio et al. 2013); ``"gumbel"``: the same with
            Gumbel noise added to the logits while training (straight-through
            Gumbel-softmax, Jang et al. 2017). Softmax and sparsemax only.

    Raises:
        ValueError: An unknown ``normalize``, ``init`` or ``straight_through``, a
            temperature <= 0, a ``top_k`` outside 1..K, or an option that only
            softmax and sparsemax routes take given to a linear route.
    """

    def __init__(
        self,
        depth: int,
        num_templates: int,
        num_tensors: int = 1,
        normalize: str = "softmax",
        init: str = "random",
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        straight_through: str | None = None,
    ):
        super().__init__()
        _check_options(normalize, temperature, top_k, straight_through, num_templates)
        self.num_templates = num_templates
        self.normalize = normalize
        self.temperature = float(temperature)
        self.top_k = top_k
        self.straight_through = straight_through
        self.anisotropic = num_tensors > 1
        shape = (depth, num_templates, num_tensors) if self.anisotropic else (depth, num_templates)
        self.logits = nn.Parameter(_initial_logits(shape, normalize, init, generator))

    @classmethod
    def from_coefficients(cls, coefficients: torch.Tensor) -> SoftRoute:
        """A linear route whose coefficients start at ``coefficients``."""
        if coefficients.ndim not in (2, 3):
            raise ValueError(
                "coefficients must be [layers, templates] or [layers, templates, tensors], "
                f"got shape {tuple(coefficients.shape)}"
            )
        depth, count = coefficients.shape[:2]
        tensors = coefficients.shape[2] if coefficients.ndim == 3 else 1
        route = cls(depth, count, tensors, normalize="linear", init="uniform")
        if coefficients.dtype.is_floating_point:  # kept, not rounded to float32
            route = route.to(coefficients.device, coefficients.dtype)
        with torch.no_grad():
            route.logits.copy_(coefficients.reshape(route.logits.shape))
        return route

    def options(self) -> dict:
        """How logits become coefficients: ``normalize`` and the options that differ
        from their defaults (keys of ``ROUTE_OPTIONS``)."""
        options = {"normalize": self.normalize}
        if self.temperature != 1.0:
            options["temperature"] = self.temperature
        if self.top_k is not None:
            options["top_k"] = self.top_k
        if self.straight_through is not None:
            options["straight_through"] = self.straight_through
        return options

    def configured(self, **options) -> SoftRoute:
        """A copy with the same logits and other options (keys of ``ROUTE_OPTIONS``).

        Options not given keep this route's values. The logits are copied as they
        are, so a route learned with softmax keeps its preferred template per layer
        under sparsemax, a temperature or a straight-through forward.

        Raises:
            ValueError: An unknown option or an invalid value (see the class).
        """
        unknown = sorted(set(options) - set(ROUTE_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown route option {unknown[0]!r}: choose from {', '.join(ROUTE_OPTIONS)}"
            )
        merged = {**self.options(), **options}
        depth, count = self.logits.shape[:2]
        tensors = self.logits.shape[2] if self.anisotropic else 1
        route = SoftRoute(depth, count, tensors, init="uniform", **merged)
        # The logits' dtype too: a float64 route copied through float32 would be rounded.
        route = route.to(self.logits.device, self.logits.dtype)
        with torch.no_grad():
            route.logits.copy_(self.logits)
        route.num_templates = self.num_templates
        return route

    @property
    def depth(self) -> int:
        return self.logits.shape[0]

    def coefficients(self) -> torch.Tensor:
        if self.normalize == "linear":
            return self.logits
        logits = self.logits / self.temperature
        if self.straight_through == "gumbel" and self.training:
            uniform = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
            logits = logits - torch.log(-torch.log(uniform))
        if self.top_k is not None and self.top_k < logits.shape[1]:
            kept = logits.topk(self.top_k, dim=1).indices  # exactly k, even with ties
            keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, kept, True)
            logits = logits.masked_fill(~keep, float("-inf"))
        if self.normalize == "softmax":
            soft = logits.softmax(dim=1)
        else:
            soft = sparsemax(logits, dim=1)
        if self.straight_through is None:
            return soft
        return _StraightThroughArgmax.apply(soft)

    def plan(self, hypernet: HyperNetwork | None = None) -> RoutePlan:
        return RoutePlan(coefficients=self.coefficients())

    def extra_repr(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options().items())
        return f"shape={tuple(self.logits.shape)}, {options}"

    def spec(self) -> dict:
        return {
            "kind": "soft",
            "shape": list(self.logits.shape),
            **self.options(),
            "num_templates": self.num_templates,
        }


class _StraightThroughArgmax(torch.autograd.Function):
    """Forward: exact one-hot rows at the argmax over dim 1; backward: the identity."""

    @staticmethod
    def forward(ctx, soft: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sparsemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of ``logits`` onto the probability simplex along ``dim``.

    Like softmax it returns non-negative weights summing to 1, but entries below a
    threshold are exactly 0 (Martins & Astudillo 2016, "From softmax to sparsemax",
    eq. 2-4). Entries of ``-inf`` get 0. Autograd gives the paper's Jacobian: the
    support is fixed, and within it the gradient is centred.

    Args:
        logits: Any float tensor.
        dim: The dimension to normalise.

    Returns:
        A tensor of the same shape and dtype, computed in at least float32 (half
        precision cannot hold the cumulative sums) on logits shifted by their
        largest finite value (which leaves the projection unchanged, and keeps the
        ``1 +`` of the support test from vanishing against logits of 1e7 and
        more). A slice holding ``nan`` or ``+inf``, or only ``-inf``, is all
        ``nan``, as softmax gives.
    """
    z = logits.movedim(dim, -1)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    excluded = z == float("-inf")
    undefined = (~torch.isfinite(z) & ~excluded).any(-1, keepdim=True) | excluded.all(
        -1, keepdim=True
    )
    valid = torch.isfinite(z)
    top = torch.where(valid, z, float("-inf")).amax(-1, keepdim=True)
    z = z - torch.where(torch.isfinite(top), top, 0).detach()
    # -inf entries sort last: below every finite logit, and never in the support.
    lowest = torch.where(valid, z, float("inf")).amin(-1, keepdim=True)
    finite = torch.where(excluded, torch.where(torch.isfinite(lowest), lowest, 0) - 1, z)
    ordered = finite.sort(dim=-1, descending=True).values
    ranks = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    cumulative = ordered.cumsum(dim=-1)
    kept = ranks <= z.shape[-1] - excluded.sum(-1, keepdim=True)
    support = ((1 + ranks * ordered > cumulative) & kept).to(z.dtype)
    size = support.sum(dim=-1, keepdim=True).clamp_min(1)
    # The support is a prefix of the sorted logits: its sum is cumulative[size - 1].
    tau = (cumulative.gather(-1, size.long() - 1) - 1) / size
    out = (finite - tau).clamp_min(0).masked_fill(excluded, 0)
    return out.masked_fill(undefined, float("nan")).movedim(-1, dim).to(logits.dtype)


def _check_options(normalize, temperature, top_k, straight_through, num_templates) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}: choose one of {NORMALIZATIONS}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"route temperature must be a number > 0, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"route temperature must be > 0, got {temperature!r}")
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_templates
    ):
        raise ValueError(f"route top_k must be an integer in 1..{num_templates}, got {top_k!r}")
    if straight_through is not None and straight_through not in STRAIGHT_THROUGH:
        raise ValueError(
            f"unknown straight_through {straight_through!r}: choose one of {STRAIGHT_THROUGH}"
        )
    if normalize == "linear" and (
        temperature != 1.0 or top_k is not None or straight_through is not None
    ):
        raise ValueError(
            "temperature, top_k and straight_through apply to softmax and sparsemax routes, "
            "not to linear ones: use normalize='softmax' or 'sparsemax'"
        )


def check_size(name: str, value: Any, low: int, meaning: str = "") -> int:
    """``value`` as an int, refused unless it is a whole number ``>= low`` (0 or 1).

    Args:
        name: What the message calls the value (an option or argument name).
        value: The value given.
        low: The smallest value accepted.
        meaning: What the value is, said in the message after the bound.

    Raises:
        ConfigError: ``name``, the bound, ``meaning`` and the value in one line.
    """
    try:  # ints, numpy and 0-d tensor integers have __index__; bools and floats are refused
        size = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        size = None
    if size is None or size < low:
        bound = "a positive int" if low == 1 else f"an int >= {low}"
        raise ConfigError(f"{name} must be {bound}{meaning}, got {value!r}")
    return size


class HyperNetwork(nn.Module):
    """Maps a low-dimensional task embedding to every layer's coefficients.

    Shared by all tasks that use ``HyperRoute``; a new task learns only its
    embedding (Schug et al. 2024). ``hidden=0`` gives a linear map.

    Args:
        embed_dim: Size of a task embedding (the input), at least 1.
        depth: Layers L it gives coefficients for, at least 1.
        num_templates: Templates K per layer, at least 1.
        num_tensors: G coefficients per (layer, template): 1, or the block's
            number of parameter tensors for anisotropic routes.
        hidden: Hidden width; 0 for a linear map.
        normalize: ``"linear"``, ``"softmax"`` or ``"sparsemax"`` over the templates.

    Raises:
        ConfigError: A size that is not a whole number in range, or an unknown
            ``normalize`` (a ``ValueError``).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_templates: int,
        num_tensors: int = 1,
        hidden: int = 0,
        normalize: str = "linear",
    ):
        super().__init__()
        embed_dim = check_size("HyperNetwork embed_dim", embed_dim, 1)
        depth = check_size("HyperNetwork depth", depth, 1)
        num_templates = check_size("HyperNetwork num_templates", num_templates, 1)
        num_tensors = check_size("HyperNetwork num_tensors", num_tensors, 1)
        hidden = check_size("HyperNetwork hidden", hidden, 0, " (0 for a linear map)")
        if normalize not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalize {normalize!r}: choose one of {NORMALIZATIONS}")
        self.embed_dim, self.depth, self.num_templates = embed_dim, depth, num_templates
        self.num_tensors, self.normalize = num_tensors, normalize
        out = depth * num_templates * num_tensors
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, out)
            )
        else:
            self.net = nn.Linear(embed_dim, out)
        last = self.net[-1] if hidden else self.net
        # Start every task near the uniform mixture so templates train evenly.
        nn.init.normal_(last.weight, std=0.1 / math.sqrt(embed_dim))
        nn.init.constant_(last.bias, 0.0 if normalize == "softmax" else 1.0 / num_templates)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Returns ``[L, K, G]`` (or ``[L, K]`` when G is 1) unnormalised coefficients."""
        out = rearrange(self.net(embedding), "(l k g) -> l k g", l=self.depth, k=self.num_templates)
        return out if self.num_tensors > 1 else out.squeeze(-1)


class HyperRoute(Route):
    """A task's embedding, turned into coefficients by the model's ``HyperNetwork``.

    Templates added to the pool after the hypernetwork was built are reached through
    ``extra``: per-task logits for the new templates only, so existing tasks and the
    shared hypernetwork are untouched by growth.

    Args:
        embed_dim: Size of the task embedding (the hypernetwork's input).
        depth: Number of layers L.
        num_templates: Templates this task can use (the pool's size when it was added).
        hyper_templates: Templates the hypernetwork produces coefficients for.
        num_tensors: G for anisotropic routes, else 1.
    """

    def __init__(
        self, embed_dim: int, depth: int, num_templates: int, hyper_templates: int, num_tensors=1
    ):
        super().__init__()
        self.num_templates = num_templates
        self.hyper_templates = hyper_templates
        self.num_tensors = num_tensors
        self._depth = depth
        self.embedding = nn.Parameter(torch.randn(embed_dim) / math.sqrt(embed_dim))
        extra = num_templates - hyper_templates
        shape = (depth, extra, num_tensors) if num_tensors > 1 else (depth, extra)
        self.extra = nn.Parameter(torch.zeros(shape)) if extra > 0 else None

    @property
    def depth(self) -> int:
        return self._depth

    def spec(self) -> dict:
        return {
            "kind": "hyper",
            "embed_dim": self.embedding.shape[0],
            "depth": self._depth,
            "num_templates": self.num_templates,
            "hyper_templates": self.hyper_templates,
            "num_tensors": self.num_tensors,
        }

    def plan(self, hypernet: HyperNetwork | None = None) -> RoutePlan:
        if hypernet is None:
            raise ValueError("a HyperRoute needs the model's HyperNetwork to resolve")
        # Without grad the embedding goes in detached (nothing would flow to it anyway):
        # torch's module tracker (FlopCounterMode) fails on a leaf that requires grad
        # as a module's input under inference_mode.
        embedding = self.embedding if torch.is_grad_enabled() else self.embedding.detach()
        logits = hypernet(embedding)
        if self.extra is not None:
            logits = torch.cat([logits, self.extra.to(logits.dtype)], dim=1)
        if hypernet.normalize == "softmax":
            logits = logits.softmax(dim=1)
        elif hypernet.normalize == "sparsemax":
            logits = sparsemax(logits, dim=1)
        return RoutePlan(coefficients=logits)


def _initial_logits(shape, normalize: str, init: str, generator) -> torch.Tensor:
    depth, count = shape[:2]
    if init == "uniform":
        base = torch.zeros(shape)
    elif init == "random":
        base = torch.randn(shape, generator=generator) * 0.5
    elif init == "cyclic":
        base = torch.zeros(shape)
        for layer in range(depth):
            base[layer, layer % count] = 2.0
    else:
        raise ValueError(f"unknown route init {init!r}: use 'random', 'uniform' or 'cyclic'")
    if normalize == "linear":
        # Linear coefficients: start at the softmax of the same logits, a convex mixture.
        base = base.softmax(dim=1)
    return base


def configured_route(route: Route, options: dict) -> SoftRoute:
    """``route`` with other soft-route options (see ``SoftRoute.configured``).

    Args:
        route: A softmax or sparsemax ``SoftRoute`` (a linear one only for
            ``{"normalize": "softmax" | "sparsemax"}``, reading its values as logits).
        options: Keys of ``ROUTE_OPTIONS``.

    Raises:
        ValueError: ``route`` is not a soft route, or an option is unknown or invalid.
    """
    if not isinstance(route, SoftRoute):
        raise ValueError(
            f"route options {options} apply to soft routes (softmax, sparsemax), not to a "
            f"{route.spec()['kind']} route"
        )
    return route.configured(**options)


def route_from_spec(spec: dict) -> Route:
    """An uninitialised route of the structure ``spec`` describes (see ``Route.spec``).

    Args:
        spec: A dict from ``Route.spec()``.
    """
    kind = spec.get("kind")
    if kind == "hard":
        return HardRoute([0] * spec["depth"], spec["num_templates"])
    if kind == "soft":
        depth, count = spec["shape"][:2]
        tensors = spec["shape"][2] if len(spec["shape"]) == 3 else 1
        options = {k: spec[k] for k in ROUTE_OPTIONS if k in spec}
        return SoftRoute(depth, count, tensors, init="uniform", **options)
    if kind == "hyper":
        return HyperRoute(
            spec["embed_dim"],
            spec["depth"],
            spec["num_templates"],
            spec["hyper_templates"],
            spec["num_tensors"],
        )
    raise ValueError(f"unknown route kind {kind!r} in a saved route spec")
