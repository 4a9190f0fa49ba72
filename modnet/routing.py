"""Routes: for every layer of a task, which templates it uses and with what weights.

A route resolves, once per forward, to a ``RoutePlan``: either template indices (a
hard route: plain block order, repeats and skips allowed) or a coefficient tensor
(a soft route, ``[L, K]`` or anisotropic ``[L, K, G]`` with one coefficient per
parameter tensor). Routes are ordinary modules of the model and inputs of its
forward pass; nothing about a task is stored as hidden mutable state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

NORMALIZATIONS = ("softmax", "linear")


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
        if key in state_dict and state_dict[key].shape != self.indices.shape:
            self.indices = torch.empty_like(state_dict[key], device=self.indices.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._indices = tuple(self.indices.tolist())

    def extra_repr(self) -> str:
        return f"indices={list(self._indices)}"

    def spec(self) -> dict:
        return {"kind": "hard", "depth": self.depth, "num_templates": self.num_templates}


class SoftRoute(Route):
    """Learned per-(layer, template) logits, optionally per parameter tensor.

    Args:
        depth: Number of layers L.
        num_templates: Templates K the route mixes.
        num_tensors: 1 for one coefficient per (layer, template); the block's number
            of parameter tensors G for anisotropic routes.
        normalize: ``"softmax"`` (convex mixing, the compositional-models default) or
            ``"linear"`` (raw coefficients, as in task-vector arithmetic).
        init: ``"random"`` (small noise, breaks symmetry between layers),
            ``"uniform"`` or ``"cyclic"`` (layer l prefers template l mod K).
    """

    def __init__(
        self,
        depth: int,
        num_templates: int,
        num_tensors: int = 1,
        normalize: str = "softmax",
        init: str = "random",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize {normalize!r}: choose one of {NORMALIZATIONS}")
        self.num_templates = num_templates
        self.normalize = normalize
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
        with torch.no_grad():
            route.logits.copy_(coefficients.reshape(route.logits.shape))
        return route

    @property
    def depth(self) -> int:
        return self.logits.shape[0]

    def coefficients(self) -> torch.Tensor:
        if self.normalize == "softmax":
            return self.logits.softmax(dim=1)
        return self.logits

    def plan(self, hypernet: HyperNetwork | None = None) -> RoutePlan:
        return RoutePlan(coefficients=self.coefficients())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, normalize={self.normalize}"

    def spec(self) -> dict:
        return {
            "kind": "soft",
            "shape": list(self.logits.shape),
            "normalize": self.normalize,
            "num_templates": self.num_templates,
        }


class HyperNetwork(nn.Module):
    """Maps a low-dimensional task embedding to every layer's coefficients.

    Shared by all tasks that use ``HyperRoute``; a new task learns only its
    embedding (Schug et al. 2024). ``hidden=0`` gives a linear map.
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
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize {normalize!r}: choose one of {NORMALIZATIONS}")
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
        logits = hypernet(self.embedding)
        if self.extra is not None:
            logits = torch.cat([logits, self.extra.to(logits.dtype)], dim=1)
        if hypernet.normalize == "softmax":
            logits = logits.softmax(dim=1)
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
        return SoftRoute(depth, count, tensors, spec["normalize"], init="uniform")
    if kind == "hyper":
        return HyperRoute(
            spec["embed_dim"],
            spec["depth"],
            spec["num_templates"],
            spec["hyper_templates"],
            spec["num_tensors"],
        )
    raise ValueError(f"unknown route kind {kind!r} in a saved route spec")
