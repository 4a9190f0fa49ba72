"""What unsupervised adaptation minimises: small modules behind one interface.

Every objective sees the pooled features of the last block (after the final
norm, ``forward_head(..., pre_logits=True)``) of a batch of each source and of
the target, plus the target's logits, and returns one scalar. Which parameters
that scalar moves is decided elsewhere (``--train``); an objective never sees a
target label.

Objectives are looked up by name in ``OBJECTIVES``; ``register_objective`` adds
new ones. Every constructor takes ``features`` (feature width) and
``num_sources`` first, then its own keyword options (``--objective-arg``), whose
types and ranges an objective declares in ``options`` (``OptionRange``) so that a
bad value is refused before any work (``check_objective_options``).
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdaptationError


@dataclass(frozen=True)
class OptionRange:
    """The type and range one option of an objective accepts.

    Attributes:
        kind: ``int`` (an integer, not a bool) or ``float`` (a finite number; an
            integer is accepted too).
        low: Smallest value accepted (None: no lower bound).
        high: Bound above (None: none).
        high_open: ``high`` itself is refused.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    high_open: bool = False

    def describe(self) -> str:
        """The valid values in words, e.g. ``at least 1 (an integer)``."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.high is None:
            bounds = f"at least {self.low}" if self.low is not None else what
            return bounds if self.low is None else f"{bounds} ({what})"
        right = ")" if self.high_open else "]"
        left = "(-inf" if self.low is None else f"[{self.low}"
        return f"in {left}, {self.high}{right} ({what})"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has the option's type and lies in its range."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and value < self.low:
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


class AdaptationObjective(nn.Module):
    """Base class: ``loss(source_features, target_features, target_logits) -> scalar``.

    Attributes:
        name: Registry name (``--objective``).
        uses_gradients: False for objectives that take no gradient steps
            (``norm_stats`` only re-estimates statistics).
        needs_source_features: False when the loss ignores the sources, so a
            route-only run need not compute them.
        progress: Fraction of the adaptation done (0 to 1), set by the trainer
            before every step, for objectives that follow a schedule.
        options: Per keyword option of the constructor, the type and range it
            accepts; checked by ``check_objective_options`` before any work and
            by the constructor (``check_options``).
    """

    name: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = True
    needs_source_features: ClassVar[bool] = True
    options: ClassVar[Mapping[str, OptionRange]] = {}

    @classmethod
    def check_options(cls, **values: Any) -> None:
        """Refuses an option value outside the type and range ``options`` declares.

        Raises:
            AdaptationError: Naming the objective, the option, the valid values and
                the value given.
        """
        for key, value in values.items():
            allowed = cls.options.get(key)
            if allowed is not None and not allowed.accepts(value):
                raise AdaptationError(
                    f"{cls.name}: {key} must be {allowed.describe()}, got {value!r}: "
                    f"give e.g. {key}={_example(cls, key, allowed)}"
                )

    def __init__(self, features: int, num_sources: int):
        super().__init__()
        self.features = features
        self.num_sources = num_sources
        self.progress = 0.0

    def loss(
        self,
        source_features: Mapping[str, torch.Tensor],
        target_features: torch.Tensor,
        target_logits: torch.Tensor,
    ) -> torch.Tensor:
        """The scalar to minimise for one batch.

        Args:
            source_features: Per source task, pooled features ``[B_s, D]``.
            target_features: The target's pooled features ``[B_t, D]``.
            target_logits: The target head's logits ``[B_t, C]``.
        """
        raise NotImplementedError


OBJECTIVES: dict[str, type[AdaptationObjective]] = {}


def register_objective(cls: type[AdaptationObjective]) -> type[AdaptationObjective]:
    """Class decorator: makes ``cls`` available as ``--objective cls.name``."""
    if not cls.name:
        raise AdaptationError(f"{cls.__name__} needs a class attribute `name` to be registered")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_class(name: str) -> type[AdaptationObjective]:
    """The objective registered as ``name``, or an error that lists the known ones."""
    if name not in OBJECTIVES:
        raise AdaptationError(
            f"unknown adaptation objective {name!r}: choose one of {', '.join(OBJECTIVES)}"
        )
    return OBJECTIVES[name]


def objective_names(uses_gradients: bool | None = None) -> list[str]:
    """The registered objectives' names, in registration order.

    Args:
        uses_gradients: Only those that take gradient steps (True), or only those
            that do not (False); None: all.
    """
    return [
        name
        for name, cls in OBJECTIVES.items()
        if uses_gradients is None or cls.uses_gradients == uses_gradients
    ]


def objective_summary() -> str:
    """The registered objectives with their options' defaults, for help texts:
    ``moments (orders=2), entropy (diversity=1.0), ...``."""
    described = []
    for name, cls in OBJECTIVES.items():
        defaults = [
            f"{p.name}={p.default!r}"
            for p in list(inspect.signature(cls).parameters.values())[2:]
            if p.default is not p.empty
        ]
        described.append(f"{name} ({', '.join(defaults)})" if defaults else name)
    return ", ".join(described)


def check_objective_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options of the objective ``name`` checked without building it (before any work).

    Every option must be one the objective's constructor takes, with the type and
    in the range the objective declares (``AdaptationObjective.options``).

    Returns:
        The options as a dict.

    Raises:
        AdaptationError: An unknown objective, or an unknown or bad option.
    """
    cls = objective_class(name)
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise AdaptationError(
            f"objective_options must be a mapping of option names to values, got {options!r}"
        )
    bad_key = next((key for key in options if not isinstance(key, str)), None)
    if bad_key is not None:
        raise AdaptationError(f"objective option names are strings, got {bad_key!r}")
    options = dict(options)
    parameters = list(inspect.signature(cls).parameters.values())[2:]  # after features, sources
    accepted = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [key for key in options if key not in accepted]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in parameters):
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
        raise AdaptationError(
            f"unknown option {unknown[0]!r} for the {name!r} objective{hint}: {takes}"
        )
    cls.check_options(**options)
    return options


def make_objective(
    name: str, features: int, num_sources: int, **options: Any
) -> AdaptationObjective:
    """Builds a registered objective; unknown or bad options are refused first
    (``check_objective_options``)."""
    cls = objective_class(name)
    check_objective_options(name, options)
    try:
        return cls(features, num_sources, **options)
    except TypeError as error:
        raise AdaptationError(
            f"bad option for the {name!r} objective ({error}): see the options of "
            f"{cls.__module__}.{cls.__name__}"
        ) from None


def _example(cls: type[AdaptationObjective], key: str, allowed: OptionRange) -> str:
    """A value ``allowed`` accepts, for the fix in an error message: the default."""
    parameter = inspect.signature(cls).parameters.get(key)
    if parameter is not None and allowed.accepts(parameter.default):
        return f"{parameter.default!r}, its default"
    low = allowed.low if allowed.low is not None else 0
    if allowed.kind is int:
        return str(math.ceil(low))
    value = float(low)
    if allowed.high is not None and allowed.high_open and value >= allowed.high:
        value = (value + allowed.high) / 2
    return str(value)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Euclidean distance as in M3SDA; the epsilon keeps the gradient finite at 0.
    return ((a - b).pow(2).sum() + 1e-12).sqrt()


@register_objective
class MomentMatching(AdaptationObjective):
    """Matches the target's feature moments to every source's (M3SDA, Peng et al. 2019).

    ``mean_s || E[f_s^k] - E[f_t^k] ||`` over sources and orders ``k = 1..orders``:
    first and second moments by default. Source-to-source terms of M3SDA are left
    out: the sources' features do not move in route-only adaptation.

    Args:
        orders: Highest moment matched.
    """

    name = "moments"
    options = {"orders": OptionRange(int, low=1)}

    def __init__(self, features: int, num_sources: int, orders: int = 2):
        super().__init__(features, num_sources)
        self.check_options(orders=orders)
        self.orders = orders

    def loss(self, source_features, target_features, target_logits):
        terms = [
            _distance(source.pow(k).mean(0), target_features.pow(k).mean(0))
            for source in source_features.values()
            for k in range(1, self.orders + 1)
        ]
        return torch.stack(terms).mean()


@register_objective
class EntropyMinimisation(AdaptationObjective):
    """Confident target predictions that still use every class (information maximisation).

    ``mean_i H(p_i) + diversity * (log C - H(mean_i p_i))``: the first term makes
    each prediction confident, the second keeps the batch's predictions spread
    over the classes, which stops the trivial solution of one class for all
    (Shi & Sha 2012; SHOT, Liang et al. 2020). Zero at its optimum.

    Args:
        diversity: Weight of the diversity term (at least 0).
    """

    name = "entropy"
    needs_source_features = False
    options = {"diversity": OptionRange(float, low=0)}

    def __init__(self, features: int, num_sources: int, diversity: float = 1.0):
        super().__init__(features, num_sources)
        self.check_options(diversity=diversity)
        self.diversity = diversity

    def loss(self, source_features, target_features, target_logits):
        log_p = target_logits.log_softmax(-1)
        per_sample = -(log_p.exp() * log_p).sum(-1).mean()
        marginal = log_p.exp().mean(0)
        marginal_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
        classes = target_logits.shape[-1]
        return per_sample + self.diversity * (math.log(classes) - marginal_entropy)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; multiplies the gradient by ``-scale`` backward (DANN's layer)."""
    return _GradientReversal.apply(x, scale)


@register_objective
class DomainAdversarial(AdaptationObjective):
    """A small discriminator tells sources from target through gradient reversal (DANN).

    The discriminator learns to separate source features from target features;
    the reversed gradient pushes whatever trains on the target side (its route)
    to make them inseparable. The reversed gradient's scale ramps up from 0 to
    ``reversal`` as in DANN (``2 / (1 + exp(-10 p)) - 1`` at progress ``p``), so
    the discriminator is informative before it steers the route. The reported
    loss is the discriminator's balanced binary cross-entropy (``log 2`` at
    chance). The discriminator is optimised with the model and discarded afterwards.

    Args:
        hidden: Width of the discriminator's hidden layer (at least 1).
        reversal: Final scale of the reversed gradient (at least 0).
    """

    name = "adversarial"
    options = {"hidden": OptionRange(int, low=1), "reversal": OptionRange(float, low=0)}

    def __init__(self, features: int, num_sources: int, hidden: int = 64, reversal: float = 1.0):
        super().__init__(features, num_sources)
        self.check_options(hidden=hidden, reversal=reversal)
        self.reversal = reversal
        self.discriminator = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def loss(self, source_features, target_features, target_logits):
        scale = self.reversal * (2.0 / (1.0 + math.exp(-10.0 * self.progress)) - 1.0)
        sources = torch.cat(list(source_features.values()))
        logits_s = self.discriminator(reverse_gradient(sources, scale)).squeeze(-1)
        logits_t = self.discriminator(reverse_gradient(target_features, scale)).squeeze(-1)
        loss_s = F.binary_cross_entropy_with_logits(logits_s, torch.ones_like(logits_s))
        loss_t = F.binary_cross_entropy_with_logits(logits_t, torch.zeros_like(logits_t))
        return 0.5 * (loss_s + loss_t)


@register_objective
class NormStatistics(AdaptationObjective):
    """Only re-estimates the target's BatchNorm statistics on its images (AdaBN).

    The simplest baseline: no gradient step, nothing but running statistics
    changes (see ``modnet.adapt.norm.reestimate_norm_stats``).
    """

    name = "norm_stats"
    uses_gradients = False
    needs_source_features = False

    def loss(self, source_features, target_features, target_logits):
        raise AdaptationError(
            "norm_stats takes no gradient steps: it re-estimates statistics instead "
            "(modnet.adapt.reestimate_norm_stats)"
        )


@register_objective
class PseudoLabelling(AdaptationObjective):
    """Cross-entropy on the target's own confident predictions (self-training).

    Each target image whose top class has probability at least ``threshold`` is
    labelled with that class (the label is held fixed for the step: no gradient
    flows through it); the loss is the mean cross-entropy over all images of the
    batch, with unconfident images counting zero, so a batch without any
    confident image gives 0 with a zero gradient. This is the strongest
    unsupervised objective of aTLAS's test-time adaptation (Zhang et al. 2024,
    after Lee 2013 and FixMatch's threshold, Sohn et al. 2020).

    Args:
        threshold: Smallest top-class probability that becomes a label (0 to 1;
            0 labels every image with its prediction).
    """

    name = "pseudo_label"
    needs_source_features = False
    options = {"threshold": OptionRange(float, low=0, high=1, high_open=True)}

    def __init__(self, features: int, num_sources: int, threshold: float = 0.9):
        super().__init__(features, num_sources)
        self.check_options(threshold=threshold)
        self.threshold = threshold

    def loss(self, source_features, target_features, target_logits):
        log_p = target_logits.log_softmax(-1)
        confidence, labels = log_p.detach().exp().max(-1)
        keep = (confidence >= self.threshold).to(log_p.dtype)
        picked = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (picked * keep).sum() / max(1, len(keep))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Squared sliced 2-Wasserstein distance of two samples along given directions.

    Both samples are projected on each direction and sorted; the larger sample
    is read at evenly spaced ranks so samples of different sizes compare.

    Args:
        a: ``[N, D]`` float samples.
        b: ``[M, D]`` float samples.
        directions: ``[D, P]`` unit directions.

    Returns:
        A scalar: the squared distance between sorted projections, averaged over
        ranks and directions.
    """
    pa = (a @ directions).sort(0).values
    pb = (b @ directions).sort(0).values
    n = min(len(pa), len(pb))
    if len(pa) != n:
        pa = pa[torch.linspace(0, len(pa) - 1, n, device=pa.device).round().long()]
    if len(pb) != n:
        pb = pb[torch.linspace(0, len(pb) - 1, n, device=pb.device).round().long()]
    return (pa - pb).pow(2).mean()


@register_objective
class SlicedWasserstein(AdaptationObjective):
    """Sliced Wasserstein distance between the target's and each source's features.

    The features are projected on ``projections`` random unit directions, drawn
    anew every step, and the sorted projections compared (squared sliced
    2-Wasserstein distance, Bonneel et al. 2015; as in SWD for adaptation, Lee
    et al. 2019): the whole one-dimensional distributions match, not only their
    first moments. Averaged over the sources.

    Args:
        projections: Random directions per step.
    """

    name = "sliced_wasserstein"
    options = {"projections": OptionRange(int, low=1)}

    def __init__(self, features: int, num_sources: int, projections: int = 128):
        super().__init__(features, num_sources)
        self.check_options(projections=projections)
        self.projections = projections

    def loss(self, source_features, target_features, target_logits):
        directions = torch.randn(
            target_features.shape[-1], self.projections, device=target_features.device
        )
        directions = directions / directions.norm(dim=0, keepdim=True)
        terms = [
            sliced_wasserstein(source, target_features, directions)
            for source in source_features.values()
        ]
        return torch.stack(terms).mean()
