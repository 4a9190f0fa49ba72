"""Diagonal Fisher information at the pretrained weights, and the two penalties built on it.

Porrello et al. (2025) show, through a second-order expansion of the loss around
the pretrained weights ``theta_0``, that modules (task vectors) compose well when
they stay in the pretraining basin, where the curvature is well described by the
Fisher information ``F`` at ``theta_0``. Two regularisers follow:

- individual training (each module on its own task):
  ``individual_penalty(tau_t, F) = sum_i F_i * tau_t,i ** 2``;
- ensemble training (through the composed model ``theta_0 + mean_k tau_k``):
  ``ensemble_penalty([tau_1..tau_T], F) = mean_k sum_i F_i * (tau_k,i - mean_j tau_j,i) ** 2``,
  the Fisher-weighted spread of the modules around their average.

``F`` is the *expected* Fisher of the model's predictive distribution,
``E_x sum_y p(y|x) (d log p(y|x) / d theta) ** 2``, from per-sample gradients with
``torch.func``, and is accumulated over tasks by adding.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from .task_vectors import TaskVector, as_names, check_shapes, scale_factor, vector_list

MODES = ("exact", "sampled")


@dataclass
class FisherDiagonal:
    """The diagonal of a Fisher information matrix, by parameter name.

    Attributes:
        values: Parameter name to its Fisher diagonal (same shape as the parameter),
            averaged over the samples it was estimated on.
        samples: How many samples the estimate rests on (summed when accumulated).
    """

    values: dict[str, torch.Tensor]
    samples: int

    @property
    def names(self) -> list[str]:
        return list(self.values)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __add__(self, other: FisherDiagonal) -> FisherDiagonal:
        """Accumulation over tasks: the Fisher of the tasks' joint likelihood is the sum.

        Raises:
            ValueError: The two cover different parameters or have other shapes.
        """
        if not isinstance(other, FisherDiagonal):
            return NotImplemented
        fix = "compute both with the same model and `names`"
        if self.values.keys() != other.values.keys():
            raise ValueError(f"the two Fisher estimates cover different parameters: {fix}")
        check_shapes(self.values, other.values, ("one Fisher estimate", "the other"), fix)
        return FisherDiagonal(
            {n: v + other.values[n] for n, v in self.values.items()}, self.samples + other.samples
        )

    def __radd__(self, other: Any) -> FisherDiagonal:
        if other == 0 or other is None:  # sum([...]) or an empty accumulator
            return self
        return NotImplemented

    def __mul__(self, scale: float) -> FisherDiagonal:
        """The estimate times a number >= 0 (a weight per task before summing).

        Raises:
            ValueError: A negative, NaN or infinite scale.
            TypeError: Through ``NotImplemented``: ``scale`` is not a number.
        """
        scale = scale_factor(scale, "a Fisher estimate's scale")
        if scale is None:
            return NotImplemented
        if scale < 0:  # a Fisher diagonal is an expected squared gradient: never negative
            raise ValueError(
                f"a Fisher estimate's scale must be >= 0, got {scale:g}: a negative one would "
                "make the penalties reward moving the weights the estimate protects"
            )
        return FisherDiagonal({n: v * scale for n, v in self.values.items()}, self.samples)

    __rmul__ = __mul__

    def mean_value(self) -> float:
        """The average entry over every parameter."""
        total = sum(float(v.double().sum()) for v in self.values.values())
        return total / max(1, sum(v.numel() for v in self.values.values()))

    def normalized(self) -> FisherDiagonal:
        """Scaled so that the average entry is 1: a penalty weight then means the same
        thing whatever the model, the data and the number of tasks accumulated."""
        mean = self.mean_value()
        if not 0 < mean < float("inf"):
            raise ValueError(
                f"the Fisher estimate's mean entry is {mean}: only one with a finite, positive "
                "mean can be normalized (recompute it)"
            )
        return self * (1.0 / mean)

    def to(self, *args: Any, **kwargs: Any) -> FisherDiagonal:
        return FisherDiagonal(
            {n: v.to(*args, **kwargs) for n, v in self.values.items()}, self.samples
        )


def diagonal_fisher(
    model: nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    names: Sequence[str] | None = None,
    mode: str = "exact",
    batch_size: int = 16,
    model_kwargs: Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> FisherDiagonal:
    """The diagonal expected Fisher of a classifier at its current weights.

    Runs the model in eval mode (dropout off, BatchNorm on its running statistics:
    per-sample gradients need every sample to be computed alone), then restores
    the mode. Squared gradients are summed in float32 whatever the model's dtype
    (bf16 sums lose small terms) and returned in each parameter's dtype; empty
    batches add nothing.

    Args:
        model: Returns logits ``[B, C]`` for a batch.
        inputs: A tensor of samples ``[N, ...]`` or an iterable of such batches.
        names: Parameters to cover (one name as a string, or several); default every
            parameter that requires grad.
        mode: ``"exact"``: sum over classes weighted by the predicted probabilities
            (C gradients per sample); ``"sampled"``: one label per sample drawn from
            the predictive distribution (one gradient per sample, unbiased).
        batch_size: Samples per vectorised chunk (exact mode holds ``batch_size * C``
            gradients at once).
        model_kwargs: Further keyword arguments of the model, e.g. ``{"task": "mnist"}``.
        generator: Random generator for ``"sampled"``.

    Raises:
        ValueError: An unknown ``mode``, a ``batch_size`` below 1, no parameter or no
            sample, or inputs that are not batches (the model does not return
            ``[B, C]`` for a batch of B).
        KeyError: ``names`` holds a name the model has no parameter of.
    """
    if mode not in MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}: choose one of {MODES}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(
            f"diagonal_fisher needs batch_size to be an integer >= 1, got {batch_size!r}"
        )
    kwargs = dict(model_kwargs or {})
    all_params = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in all_params.items() if p.requires_grad]
    names = as_names(names)
    missing = [n for n in names if n not in all_params]
    if missing:
        raise KeyError(f"the model has no parameter(s) {missing[:3]}: check `names`")
    if not names:
        raise ValueError(
            "no parameter to compute the Fisher for: pass `names` or unfreeze the parameters"
        )
    params = {n: all_params[n].detach() for n in names}

    def log_probs(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (x.unsqueeze(0),), kwargs, tie_weights=False)
        if logits.ndim != 2:
            raise ValueError(f"the model must return logits [B, C], got {tuple(logits.shape)}")
        return logits[0].float().log_softmax(-1)

    def exact(p: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        def with_aux(q):
            out = log_probs(q, x)
            return out, out.detach()

        jacobian, logp = jacrev(with_aux, has_aux=True)(p)
        probs = logp.exp()
        # in float32: the log-probabilities are, and a bf16 model's Jacobian is not
        return {
            n: torch.einsum("c,c...->...", probs, j.float().pow(2)) for n, j in jacobian.items()
        }

    def sampled(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        gradient = grad(lambda q: log_probs(q, x)[y])(p)
        return {n: g.float().pow(2) for n, g in gradient.items()}

    batches = inputs.split(batch_size) if torch.is_tensor(inputs) else inputs
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        # torch.func transforms take their own gradients under no_grad; without it the
        # results would keep a graph to the parameters left out of `names` (a head, say).
        with torch.no_grad():
            for batch in batches:
                for chunk in batch.split(batch_size):
                    if len(chunk) == 0:  # an empty batch adds nothing
                        continue
                    logits = _batch_logits(model, chunk, kwargs)  # inputs are checked as given
                    if mode == "exact":
                        per_sample = vmap(exact, in_dims=(None, 0))(params, chunk)
                    else:
                        probs = logits.softmax(-1)
                        labels = torch.multinomial(probs, 1, generator=generator)[:, 0]
                        per_sample = vmap(sampled, in_dims=(None, 0, 0))(params, chunk, labels)
                    for n, value in per_sample.items():
                        totals[n] += value.sum(0)
                    count += len(chunk)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no samples to estimate the Fisher from: `inputs` is empty")
    return FisherDiagonal({n: (t / count).to(params[n].dtype) for n, t in totals.items()}, count)


def _batch_logits(model: nn.Module, chunk: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The model's logits for a chunk of samples, checked to be ``[len(chunk), C]``."""
    logits = model(chunk, **kwargs).float()
    if logits.ndim != 2 or len(logits) != len(chunk):
        raise ValueError(
            f"the model must return logits [B, C] for a batch of B samples, got "
            f"{tuple(logits.shape)} for inputs {tuple(chunk.shape)}: pass a batch [N, ...] "
            "(one sample x as x.unsqueeze(0))"
        )
    return logits


def _check_covered(tau: TaskVector, fisher: FisherDiagonal) -> None:
    """Raises unless ``fisher`` holds every tensor of ``tau``, with its shape."""
    missing = [n for n in tau.names if n not in fisher.values]
    if missing:
        raise KeyError(
            f"the Fisher estimate does not cover {missing[:3]}: compute it over the parameters "
            "the task vectors change (`names=tau.names`)"
        )
    fix = "compute the Fisher on the model the task vectors come from"
    check_shapes(tau, fisher.values, ("the task vector", "the Fisher estimate"), fix)


def individual_penalty(
    tau: TaskVector | Mapping[str, torch.Tensor], fisher: FisherDiagonal
) -> torch.Tensor:
    """``sum_i F_i * tau_i ** 2``: keeps one module in the pretraining basin.

    Build ``tau`` with ``TaskVector.from_models(pretrained, model, detach=False)`` so
    that the penalty trains the model.

    Raises:
        KeyError: ``fisher`` does not cover a tensor of ``tau``.
        ValueError: ``fisher`` holds one of them with another shape.
    """
    tau = tau if isinstance(tau, TaskVector) else TaskVector(tau)
    _check_covered(tau, fisher)
    return sum((fisher.values[n].to(t) * t.pow(2)).sum() for n, t in tau.items())


def ensemble_penalty(
    taus: Sequence[TaskVector | Mapping[str, torch.Tensor]], fisher: FisherDiagonal
) -> torch.Tensor:
    """``mean_k sum_i F_i * (tau_k,i - mean_j tau_j,i) ** 2``: the modules' Fisher-weighted spread.

    Small spread keeps the composed model's loss close to the average of the
    modules' losses (the second-order term of the expansion around their mean).

    Raises:
        TypeError: ``taus`` is one vector rather than a list.
        ValueError: Fewer than two modules, modules over different tensors or shapes
            (as ``tau_a + tau_b`` refuses them), or ``fisher`` of other shapes.
        KeyError: ``fisher`` does not cover a tensor of the modules.
    """
    if not isinstance(taus, TaskVector):
        taus = [TaskVector(t) if isinstance(t, Mapping) else t for t in taus]
    taus = vector_list(taus, "ensemble_penalty")
    if len(taus) < 2:
        raise ValueError("the ensemble penalty needs at least two modules (it is their spread)")
    _check_covered(taus[0], fisher)
    total = 0.0
    for name in taus[0].names:
        stacked = torch.stack([t[name] for t in taus])
        spread = (stacked - stacked.mean(0, keepdim=True)).pow(2).mean(0)
        total = total + (fisher.values[name].to(spread) * spread).sum()
    return total
