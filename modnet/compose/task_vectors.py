"""Task vectors: what fine-tuning changed, as a set of named tensors.

A task vector is ``finetuned - pretrained`` for every parameter tensor the two
models share (Ilharco et al. 2023). Vectors add, subtract, negate and scale like
vectors, so editing a model is arithmetic: ``(tau_a + tau_b).apply(model)`` adds
two skills, ``(-tau_a).apply(model)`` removes one. They are the templates of
task-vector composition: ``W = base + sum_k c[k] * tau_k`` (see
``TaskVectorComposer``).

Only parameters are covered. BatchNorm running statistics are measurements of
the data, not weights: modnet keeps them per task, and composing them has no
meaning. ``from_state_dicts`` refuses them (a ``state_dict()`` holds them), and
applying a vector that holds another buffer of the model is refused by name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

# BatchNorm's floating-point buffers, as state_dict() names end (modnet's pools too)
RUNNING_STATISTICS = ("running_mean", "running_var")


def scale_factor(value: Any, what: str = "a scale", required: bool = False) -> float | None:
    """``value`` as the number a vector is scaled by: a real number, NumPy scalar, or
    one-element real tensor or array, as the Python float it holds.

    Args:
        value: The candidate scale.
        what: What ``value`` is, for the errors.
        required: Refuse a non-number with ``TypeError`` instead of returning ``None``
            (operators return ``NotImplemented`` on ``None``).

    Returns:
        The float; ``None`` for anything else unless ``required``.

    Raises:
        ValueError: ``value`` is NaN or infinite: it would make every tensor it scales so.
        TypeError: ``required`` and ``value`` is not a number.
    """
    number = None
    if isinstance(value, numbers.Real):
        number = float(value)  # a NumPy scalar acts as the Python number it holds
    elif (torch.is_tensor(value) or hasattr(value, "__array__")) and not isinstance(value, str):
        try:
            tensor = torch.as_tensor(value).detach()
        except (TypeError, ValueError, RuntimeError):
            tensor = None
        if tensor is not None and tensor.numel() == 1 and not tensor.is_complex():
            number = float(tensor)
    if number is None and required:
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}")
    if number is not None and not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {number}")
    return number


def _operand(value: Any, what: str) -> float | torch.Tensor:
    """A checked ``scale_factor``; a tensor stays a 0-d tensor, so a learned scale keeps its
    gradient."""
    number = scale_factor(value, what, required=True)
    return value.reshape(()) if torch.is_tensor(value) else number


def as_names(value: str | Iterable[str]) -> tuple[str, ...]:
    """Names or name prefixes as a tuple: one string is one name, not its characters."""
    return (value,) if isinstance(value, str) else tuple(value)


class TaskVector:
    """Named tensors ``finetuned - pretrained``; supports ``+``, ``-``, ``*`` and ``/``.

    A scale is any finite real number, Python's or NumPy's (``np.float32(0.5) * tau``
    is ``0.5 * tau``), so a sweep over ``np.linspace`` works as over a list of floats;
    NaN and infinity are refused with ``ValueError`` wherever a scale is taken.

    Build one with ``TaskVector.from_models`` (or ``from_state_dicts``); apply it to
    a model with ``apply`` (in place) or run a model through it with ``run``
    (functionally, differentiable in the vector).

    Args:
        tensors: Parameter name to difference tensor.
    """

    # NumPy defers ``np.float32(0.5) * tau`` to ``__rmul__`` instead of making an array.
    __array_ufunc__ = None

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        if not tensors:
            raise ValueError(
                "a task vector needs at least one tensor: the two models share no floating-point "
                "parameter of the same name and shape (check `exclude` and that both come from "
                "the same architecture)"
            )
        self._tensors: dict[str, torch.Tensor] = dict(tensors)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        exclude: str | Sequence[str] = (),
        detach: bool = True,
    ) -> TaskVector:
        """``finetuned[n] - pretrained[n]`` for every floating-point tensor both hold.

        Pass parameters only, e.g. ``dict(model.named_parameters())``, not a
        ``state_dict()``: that also holds buffers, which are not weights (see the
        module doc). Names found in only one of them (a new task's head, say) are
        skipped.

        Args:
            pretrained: Parameters of the starting point.
            finetuned: Parameters after fine-tuning.
            exclude: Name prefixes to leave out, e.g. ``("heads.", "routes.")``, or one
                prefix as a string (``"heads."``).
            detach: ``False`` keeps the graph to ``finetuned``'s tensors, so the
                vector can enter a loss (the Fisher penalties train through it).

        Raises:
            ValueError: A name both hold has different shapes, an entry is a BatchNorm
                running statistic (``*running_mean``, ``*running_var``), or no tensor is left.
        """
        exclude, tensors = as_names(exclude), {}
        for name, before in pretrained.items():
            after = finetuned.get(name)
            if after is None or name.startswith(exclude):
                continue
            if not (before.is_floating_point() and after.is_floating_point()):
                continue
            if name.endswith(RUNNING_STATISTICS):
                raise ValueError(
                    f"'{name}' is a BatchNorm running statistic, not a weight: pass parameters "
                    "only, e.g. dict(model.named_parameters()), or use TaskVector.from_models"
                )
            if before.shape != after.shape:
                raise ValueError(
                    f"'{name}' has shape {tuple(before.shape)} in the pretrained model and "
                    f"{tuple(after.shape)} in the fine-tuned one: a task vector needs equal "
                    f"shapes; leave it out with exclude=({name!r},)"
                )
            difference = after - before.detach()
            tensors[name] = difference.detach().clone() if detach else difference
        return cls(tensors)

    @classmethod
    def from_models(
        cls,
        pretrained: nn.Module,
        finetuned: nn.Module,
        exclude: str | Sequence[str] = (),
        detach: bool = True,
    ) -> TaskVector:
        """The vector between two models' parameters (buffers are not weights; see module doc).

        Args:
            pretrained: The starting point.
            finetuned: The same architecture after fine-tuning.
            exclude: Name prefixes to leave out, e.g. ``("heads.", "routes.")``, or one
                prefix as a string (``"heads."``).
            detach: ``False`` keeps the graph to ``finetuned``'s parameters.
        """
        return cls.from_state_dicts(
            dict(pretrained.named_parameters()),
            dict(finetuned.named_parameters()),
            exclude=exclude,
            detach=detach,
        )

    @classmethod
    def zeros_like(cls, model: nn.Module, exclude: str | Sequence[str] = ()) -> TaskVector:
        """A zero vector over ``model``'s floating-point parameters but those ``exclude``d
        (name prefixes, or one prefix as a string)."""
        exclude = as_names(exclude)
        return cls(
            {
                name: torch.zeros_like(p.detach())
                for name, p in model.named_parameters()
                if p.is_floating_point() and not name.startswith(exclude)
            }
        )

    @staticmethod
    def mean(vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
        """The (weighted) average of several vectors: composition by averaging modules.

        Args:
            vectors: A list of vectors over the same tensors.
            weights: One finite weight per vector; default equal weights ``1 / len(vectors)``.

        Raises:
            TypeError: ``vectors`` is one ``TaskVector`` (pass ``[tau]``) or holds
                something else.
            ValueError: No vector, vectors over different tensors, not as many weights
                as vectors, or a NaN or infinite weight.
        """
        vectors = vector_list(vectors, "TaskVector.mean")
        if weights is None:
            weights = [1.0 / len(vectors)] * len(vectors)
        if len(weights) != len(vectors):
            raise ValueError(f"got {len(weights)} weights for {len(vectors)} vectors")
        weights = [_operand(w, "a weight of TaskVector.mean") for w in weights]
        return TaskVector(
            {
                name: sum(w * v[name] for w, v in zip(weights, vectors, strict=True))
                for name in vectors[0].names
            }
        )

    # ------------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def items(self) -> Iterable[tuple[str, torch.Tensor]]:
        return self._tensors.items()

    def numel(self) -> int:
        return sum(t.numel() for t in self._tensors.values())

    def to(self, *args: Any, **kwargs: Any) -> TaskVector:
        return TaskVector({n: t.to(*args, **kwargs) for n, t in self.items()})

    def detach(self) -> TaskVector:
        return TaskVector({n: t.detach() for n, t in self.items()})

    def norm(self) -> float:
        """Euclidean norm over all tensors."""
        return math.sqrt(
            sum(float(t.detach().double().pow(2).sum()) for t in self._tensors.values())
        )

    def dot(self, other: TaskVector) -> float:
        self._check_same(other)
        return sum(
            float((t.detach().double() * other[n].detach().double()).sum()) for n, t in self.items()
        )

    def cosine(self, other: TaskVector) -> float:
        """Cosine similarity: how much two tasks pushed the weights the same way."""
        denominator = self.norm() * other.norm()
        return self.dot(other) / denominator if denominator else 0.0

    # --------------------------------------------------------------- arithmetic
    def _check_same(self, other: Any) -> None:
        if not isinstance(other, TaskVector):
            raise TypeError(f"expected a TaskVector, got {type(other).__name__}")
        if self._tensors.keys() != other._tensors.keys():
            left = sorted(set(self.names) - set(other.names))[:3]
            right = sorted(set(other.names) - set(self.names))[:3]
            raise ValueError(
                f"task vectors cover different tensors (only in the first: {left}, only in the "
                f"second: {right}): build both from the same pretrained model with the same "
                "`exclude`"
            )
        check_shapes(
            self, other, ("one vector", "the other"), "vectors must come from one architecture"
        )

    def __add__(self, other: TaskVector) -> TaskVector:
        self._check_same(other)
        return TaskVector({n: t + other[n] for n, t in self.items()})

    def __radd__(self, other: Any) -> TaskVector:
        if isinstance(other, numbers.Real) and other == 0:  # sum([...]) starts at 0
            return self
        return NotImplemented

    def __sub__(self, other: TaskVector) -> TaskVector:
        self._check_same(other)
        return TaskVector({n: t - other[n] for n, t in self.items()})

    def __neg__(self) -> TaskVector:
        return TaskVector({n: -t for n, t in self.items()})

    def __mul__(self, scale: float) -> TaskVector:
        scale = scale_factor(scale, "a task vector's scale")
        if scale is None:
            return NotImplemented
        return TaskVector({n: t * scale for n, t in self.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> TaskVector:
        scale = scale_factor(scale, "a task vector's divisor")
        if scale is None:
            return NotImplemented
        if scale == 0:  # as for numbers: not a vector of inf and nan
            raise ZeroDivisionError("a task vector divided by zero")
        return TaskVector({n: t / scale for n, t in self.items()})

    # ----------------------------------------------------------------- applying
    def _parameters_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params]
        buffers = [n for n, _ in model.named_buffers() if n in missing]
        if buffers:
            raise KeyError(
                f"{buffers[:3]} are buffers of the model, not parameters: a task vector covers "
                "parameters only; build it with TaskVector.from_models"
            )
        if missing:
            raise KeyError(
                f"the model has no parameter(s) {missing[:3]} that this task vector changes: "
                "apply it to the architecture it was made from"
            )
        fix = "apply it to the architecture it was made from"
        check_shapes(params, self, ("the model", "the task vector"), fix)
        return params

    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0) -> nn.Module:
        """Adds ``scale * self`` to ``model``'s parameters in place and returns ``model``.

        Raises:
            TypeError: ``scale`` is not a real number.
            ValueError: ``scale`` is NaN or infinite, or ``model`` has other shapes.
            KeyError: ``model`` lacks a parameter of the vector. Nothing is changed then.
        """
        scale = scale_factor(scale, "scale", required=True)
        params = self._parameters_of(model)
        for name, tensor in self.items():
            params[name].add_(tensor.to(params[name]), alpha=scale)
        return model

    def weights(self, model: nn.Module, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``model``'s parameters plus ``scale * self``, for ``torch.func.functional_call``.

        A one-element tensor ``scale`` keeps its gradient. Raises as ``apply``.
        """
        scale = _operand(scale, "scale")
        params = self._parameters_of(model)
        return {name: params[name] + scale * tensor for name, tensor in self.items()}

    def run(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Calls ``model(*args, **kwargs)`` with ``self`` added to its weights, functionally.

        The model is not modified, and gradients flow into the vector: how a module
        is trained through a composed model (ensemble training).
        """
        return functional_call(model, self.weights(model), args, kwargs, tie_weights=False)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, {self.numel():,} values, norm={self.norm():.4g})"


def check_shapes(first: Any, second: Any, labels: tuple[str, str], fix: str) -> None:
    """Raises ``ValueError`` naming the first tensor whose shape differs between two
    name-to-tensor collections (a dict, a ``TaskVector``); names only one holds are not
    compared.

    Args:
        first, second: The two collections.
        labels: What they are, for the message (``"the model"``).
        fix: What to do about it, for the message.
    """
    for name, tensor in first.items():
        if name in second and tensor.shape != second[name].shape:
            raise ValueError(
                f"'{name}' has shape {tuple(tensor.shape)} in {labels[0]} and "
                f"{tuple(second[name].shape)} in {labels[1]}: {fix}"
            )


def vector_list(vectors: Iterable[TaskVector], what: str) -> list[TaskVector]:
    """``vectors`` as a non-empty list of task vectors over the same tensors.

    Raises:
        TypeError: ``vectors`` is one ``TaskVector`` rather than a list of them, or
            holds something that is not a ``TaskVector``.
        ValueError: It is empty, or its vectors cover different tensors.
    """
    if isinstance(vectors, TaskVector):
        raise TypeError(f"{what} takes a list of task vectors, got one TaskVector: pass [tau]")
    vectors = list(vectors)
    if not vectors:
        raise ValueError(f"{what} needs at least one task vector")
    for vector in vectors:
        if not isinstance(vector, TaskVector):
            raise TypeError(f"{what} takes task vectors, got a {type(vector).__name__}")
    for other in vectors[1:]:
        vectors[0]._check_same(other)
    return vectors
