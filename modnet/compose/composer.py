"""Learned composition of task vectors: ``W[g] = base[g] + sum_k c[k, g] * tau_k[g]``.

The same primitive as a template pool, with the pretrained weights as ``base``
and task vectors as templates (aTLAS, Zhang et al. 2024): every vector is stored
stacked ``[K, *shape]`` per parameter tensor, and the model runs with the
composed tensors through ``torch.func.functional_call``, so any ``nn.Module``
(a timm model, a ``ModularNet``) can be composed without changing its code.

Coefficients are *isotropic* (one per vector) or *anisotropic* (one per vector
and parameter tensor ``g``). A template pool's stacked tensor ``[K, *shape]``
holds K templates; with ``per_template`` each counts as a tensor of its own, so
every template gets its own coefficient. The plain network a ``ModularNet``
exports has no templates but one tensor per block (``depth`` of them, each a mix
of the templates), so the two get different coefficients: as many only when the
depth equals the number of templates, and even then one scales a template, the
other a block.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..binding import mangle
from ..pool import TemplatePool
from .task_vectors import TaskVector, scale_factor, vector_list

VectorsArg = Sequence[TaskVector] | Mapping[str, TaskVector]


class TaskVectorComposer(nn.Module):
    """A frozen model plus frozen task vectors; only the coefficients learn.

    ``composer(*args, **kwargs)`` calls the model with the composed weights. While
    gradients are recorded for the coefficients every vector takes part; otherwise
    (evaluation, fixed coefficients) a vector whose coefficient for a tensor is
    zero is skipped for that tensor, so the cost follows the non-zero coefficients,
    and all-zero coefficients run the base weights themselves.

    Args:
        model: The pretrained model. Its parameters are frozen unless ``freeze`` is
            False; unfreeze what else should learn (a new head) yourself.
        vectors: A list of task vectors over the same tensors, or a mapping that
            names them.
        anisotropic: One coefficient per vector and parameter tensor; else one per
            vector.
        init: Initial coefficients: a number (Python's, NumPy's or a one-element
            tensor) for all, or a tensor ``[K]`` / ``[K, G]``.
        per_template: Count each template of a ``TemplatePool`` tensor as its own
            parameter tensor (see the module docstring).
        freeze: Set ``requires_grad=False`` on every parameter of ``model``.

    Raises:
        TypeError: ``vectors`` is one ``TaskVector`` (pass ``[tau]``) or holds something
            else, or ``init`` is not a number or tensor.
        ValueError: No vector, vectors over different tensors or other shapes than
            ``model``'s, or ``init`` of another shape or not finite. Everything is
            checked before ``model`` is frozen.
        KeyError: ``model`` lacks a tensor the vectors change.
    """

    def __init__(
        self,
        model: nn.Module,
        vectors: VectorsArg,
        anisotropic: bool = True,
        init: float | torch.Tensor = 0.0,
        per_template: bool = True,
        freeze: bool = True,
    ):
        super().__init__()
        if isinstance(vectors, Mapping):
            self.vector_names = [str(name) for name in vectors]
            vectors = vector_list(vectors.values(), "TaskVectorComposer")
        else:
            vectors = vector_list(vectors, "TaskVectorComposer")
            self.vector_names = [str(k) for k in range(len(vectors))]
        params = vectors[0]._parameters_of(model)
        self.model = model
        self.anisotropic = anisotropic
        self.tensor_names = tuple(vectors[0].names)
        stacked = _template_tensor_names(model) if per_template else set()
        self._layout: dict[str, tuple[int, int]] = {}
        self.group_names: list[str] = []
        for name in self.tensor_names:
            rows = params[name].shape[0] if name in stacked else 1
            self._layout[name] = (len(self.group_names), rows)
            self.group_names += [f"{name}[{r}]" for r in range(rows)] if rows > 1 else [name]
            reference = params[name]
            self.register_buffer(
                _buffer(name), torch.stack([v[name].to(reference) for v in vectors]).detach()
            )
        shape = (len(vectors), len(self.group_names)) if anisotropic else (len(vectors),)
        reference = params[self.tensor_names[0]]
        self.coefficients = nn.Parameter(_coefficients(init, "init", shape, reference))
        if freeze:  # last: a refused argument leaves the model as it was
            model.requires_grad_(False)

    # --------------------------------------------------------------- structure
    @property
    def num_vectors(self) -> int:
        return len(self.vector_names)

    @property
    def num_groups(self) -> int:
        """G: parameter tensors with a coefficient of their own (anisotropic axis)."""
        return len(self.group_names)

    def vectors(self, name: str) -> torch.Tensor:
        """The stacked task vectors of tensor ``name``: ``[K, *shape]``."""
        return getattr(self, _buffer(name))

    def coefficient_matrix(self) -> torch.Tensor:
        """Coefficients as ``[K, G]`` (an isotropic vector's one value repeated)."""
        if self.anisotropic:
            return self.coefficients
        return self.coefficients.unsqueeze(1).expand(-1, self.num_groups)

    @torch.no_grad()
    def set_coefficients(self, values: torch.Tensor | Sequence[float]) -> None:
        """Sets the coefficients: a number (all), ``[K]`` (broadcast over tensors) or ``[K, G]``.

        Composition by averaging, unlearning by removal (a zero) and specialisation by
        reweighting are all a choice of coefficients.

        Raises:
            TypeError: ``values`` is not a number or tensor.
            ValueError: ``values`` has another shape or is not finite (nothing is changed).
        """
        shape = tuple(self.coefficients.shape)
        self.coefficients.copy_(_coefficients(values, "coefficients", shape, self.coefficients))

    # ----------------------------------------------------------------- running
    def composed_weights(self) -> dict[str, torch.Tensor]:
        """``base + sum_k c[k, g] * tau_k`` for every tensor the vectors cover."""
        c = self.coefficient_matrix()
        count = self.num_vectors
        skip_zeros = not (torch.is_grad_enabled() and c.requires_grad)
        nonzero = c.detach().ne(0).cpu() if skip_zeros else None  # one device sync per call
        params = dict(self.model.named_parameters())
        weights = {}
        for name, (start, rows) in self._layout.items():
            base, tau = params[name], self.vectors(name)
            coeff = c[:, start : start + rows]
            if nonzero is not None:
                active = nonzero[:, start : start + rows].any(dim=1).nonzero().flatten()
                if active.numel() == 0:
                    weights[name] = base
                    continue
                if active.numel() < count:
                    index = active.to(tau.device)
                    coeff, tau = coeff.index_select(0, index), tau.index_select(0, index)
            k = coeff.shape[0]
            coeff = coeff.to(tau.dtype)
            if rows == 1:
                delta = (coeff[:, 0] @ tau.reshape(k, -1)).view(base.shape)
            else:
                delta = torch.einsum("kr,krp->rp", coeff, tau.reshape(k, rows, -1))
                delta = delta.view(base.shape)
            weights[name] = base + delta
        return weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output with the composed weights."""
        return functional_call(self.model, self.composed_weights(), args, kwargs, tie_weights=False)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """A copy of the model with the composed weights written in: no composer at run time."""
        weights = self.composed_weights()
        model = copy.deepcopy(self.model)
        params = dict(model.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value)
        return model

    def extra_repr(self) -> str:
        kind = "anisotropic" if self.anisotropic else "isotropic"
        return f"vectors={self.vector_names}, tensors={self.num_groups}, {kind}"


def _coefficients(
    values: Any, what: str, shape: tuple[int, ...], reference: torch.Tensor
) -> torch.Tensor:
    """``values`` as a new tensor of coefficients of ``shape``, like ``reference``.

    A number (as ``scale_factor`` reads it) fills the shape; ``[K]`` is broadcast
    over the tensors of an anisotropic ``[K, G]``. NaN and infinity are refused.
    """
    like = dict(dtype=reference.dtype, device=reference.device)
    number = scale_factor(values, what)
    if number is not None:
        return torch.full(shape, number, **like)
    kinds = "[vectors, tensors] or [vectors]" if len(shape) == 2 else "[vectors]"
    expected = f"{what} must be a number or a tensor of shape {shape} ({kinds})"
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError
        tensor = torch.as_tensor(values, **like)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{expected}, got {type(values).__name__} {values!r}") from None
    if tensor.ndim == 1 and len(shape) == 2 and len(tensor) == shape[0]:
        tensor = tensor.unsqueeze(1).expand(shape)
    if tensor.shape != shape:
        raise ValueError(f"{expected}, got {tuple(tensor.shape)}")
    if not bool(tensor.isfinite().all()):
        raise ValueError(f"{what} must be finite, got NaN or infinite entries: {values!r}")
    return tensor.clone()


def _buffer(name: str) -> str:
    return "tau__" + mangle(name)


def _template_tensor_names(model: nn.Module) -> set[str]:
    """Full names of every ``TemplatePool`` parameter: stacked ``[K, *shape]`` tensors."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, TemplatePool):
            lead = f"{prefix}." if prefix else ""
            names.update(lead + n for n, _ in module.named_parameters())
    return names
