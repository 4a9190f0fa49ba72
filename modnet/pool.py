"""TemplatePool: K interchangeable parameter sets of one block architecture."""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .binding import TensorBinder, is_batchnorm_buffer, mangle
from .errors import ConfigError
from .folding import FoldedRunner
from .grouped import GroupedRunner

BlockFactory = Callable[[], nn.Module]


class TemplateChunk(nn.Module):
    """Templates added together, stacked along a leading template axis.

    Growth appends a new chunk instead of rewriting the stacked tensors, so older
    templates keep their storage, their optimizer state and their ``requires_grad``.
    """

    def __init__(self, stacked: Mapping[str, torch.Tensor]):
        super().__init__()
        self.names = tuple(stacked)
        for name, tensor in stacked.items():
            self.register_parameter(mangle(name), nn.Parameter(tensor))
        self.num_templates = next(iter(stacked.values())).shape[0]

    def tensor(self, name: str) -> torch.Tensor:
        return getattr(self, mangle(name))

    def _apply(self, fn, recurse=True):
        # ``module.to(memory_format=torch.channels_last)`` converts 4-D tensors only: a
        # stacked conv weight [K, O, I, kh, kw] is converted as K*O filters, so that
        # every template's 4-D view gets the layout a plain conv weight would.
        def per_template(t: torch.Tensor) -> torch.Tensor:
            if t.dim() != 5:
                return fn(t)
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])

        return super()._apply(per_template, recurse)


class TemplatePool(nn.Module):
    """K templates of one block: every parameter tensor stored as ``[K, *shape]``.

    A template is a full parameter set of the block (norm affine parameters
    included). Stacking makes mixing all layers of a task one ``(L, K) @ (K, P)``
    product per parameter tensor, done once per forward whatever the batch size.
    BatchNorm running statistics are not part of a template: a model keeps them
    per task and per layer (see ``TaskNormStats``) and passes them in.

    Args:
        blocks: One block per template. All must have the same parameter names and
            shapes; their parameters are copied into the pool.
        block_factory: Builds a freshly initialised block; used by ``grow``.
    """

    def __init__(self, blocks: Sequence[nn.Module], block_factory: BlockFactory | None = None):
        super().__init__()
        if not blocks:
            raise ValueError("a TemplatePool needs at least one block to take its templates from")
        reference = blocks[0]
        self.tensor_names = tuple(name for name, _ in reference.named_parameters())
        self.tensor_shapes = {n: tuple(p.shape) for n, p in reference.named_parameters()}
        buffer_names = [name for name, _ in reference.named_buffers()]
        self.stat_names = tuple(n for n in buffer_names if is_batchnorm_buffer(reference, n))
        self.shared_buffer_names = tuple(n for n in buffer_names if n not in self.stat_names)
        self.initial_stats = {n: reference.get_buffer(n).detach().clone() for n in self.stat_names}
        for name in self.shared_buffer_names:
            self.register_buffer(mangle(name), reference.get_buffer(name).detach().clone())
        self.block_factory = block_factory

        skeleton = copy.deepcopy(reference).to("meta")
        # Held outside the module tree: its tensors are placeholders, replaced on every call.
        self._binder = TensorBinder(skeleton, (*self.tensor_names, *buffer_names))
        self.chunks = nn.ModuleList([TemplateChunk(self._stack(blocks))])
        # Built here, not on first use: building inside a compiled forward breaks the graph.
        self.__dict__["_grouped"] = GroupedRunner.build(self._binder.module, per_task=True)
        # Inference runs BatchNorm folded into the conv before it (see ``modnet.folding``).
        self.__dict__["_folded"] = FoldedRunner.build(self._binder.module, self._binder.names)
        self.fold_batchnorm = True

    def train(self, mode: bool = True) -> TemplatePool:
        # The skeletons are outside the module tree, so nn.Module.train cannot reach them.
        super().train(mode)
        for skeleton in self.skeletons():
            skeleton.train(mode)
        return self

    def skeletons(self) -> list[nn.Module]:
        """The tensor-less copies of the block that run it: plain and grouped."""
        grouped = self.__dict__.get("_grouped")
        return [self._binder.module] + ([grouped.module] if grouped is not None else [])

    @property
    def grouped(self) -> GroupedRunner | None:
        """Runs the block for a mixed-task batch (see ``modnet.grouped``); ``None`` when
        the block has a layer with parameters that has no per-sample version."""
        return self.__dict__["_grouped"]

    # ----------------------------------------------------------------- structure
    @property
    def num_templates(self) -> int:
        return sum(chunk.num_templates for chunk in self.chunks)

    @property
    def num_tensors(self) -> int:
        """Parameter tensors per template: the size of an anisotropic coefficient axis."""
        return len(self.tensor_names)

    @property
    def template_numel(self) -> int:
        return sum(torch.Size(s).numel() for s in self.tensor_shapes.values())

    def _stack(self, blocks: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
        for index, block in enumerate(blocks):
            params = dict(block.named_parameters())
            if set(params) != set(self.tensor_names):
                missing = sorted(set(self.tensor_names) - set(params))
                extra = sorted(set(params) - set(self.tensor_names))
                raise ValueError(
                    f"template {index} does not match the pool's block architecture "
                    f"(missing {missing}, unexpected {extra}): all templates must be the same block"
                )
            for name in self.tensor_names:
                if tuple(params[name].shape) != self.tensor_shapes[name]:
                    raise ValueError(
                        f"template {index} has '{name}' of shape {tuple(params[name].shape)}, "
                        f"the pool expects {self.tensor_shapes[name]}: all templates must share "
                        "one architecture"
                    )
        return {
            name: torch.stack([b.get_parameter(name).detach() for b in blocks]).clone()
            for name in self.tensor_names
        }

    def stacked(self, name: str, num_templates: int | None = None) -> torch.Tensor:
        """Templates ``[0, num_templates)`` of one tensor as ``[K, *shape]``."""
        count = self.num_templates if num_templates is None else num_templates
        parts, have = [], 0
        for chunk in self.chunks:
            if have >= count:
                break
            parts.append(chunk.tensor(name))
            have += chunk.num_templates
        if have != count:
            raise ValueError(f"a route covers {count} templates; chunk sizes do not add up to it")
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _locate(self, index: int) -> tuple[TemplateChunk, int]:
        for chunk in self.chunks:
            if index < chunk.num_templates:
                return chunk, index
            index -= chunk.num_templates
        raise IndexError(f"template index out of range: the pool has {self.num_templates}")

    # -------------------------------------------------------------- weights out
    def select(self, index: int) -> dict[str, torch.Tensor]:
        """Template ``index`` as views: a hard route copies no weights."""
        chunk, local = self._locate(index)
        return {name: chunk.tensor(name)[local] for name in self.tensor_names}

    def select_many(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Templates ``indices`` as views, one dict per entry: a hard route's layers.

        When gradients are recorded, each stacked tensor is unbound once instead of
        indexed once per layer: the backward of ``unbind`` stacks all gradients in one
        op, where a per-layer index allocates, zero-fills and accumulates a whole
        ``[K, *shape]`` gradient for every layer.
        """
        if not torch.is_grad_enabled():
            return [self.select(index) for index in indices]
        views = {
            name: [view for chunk in self.chunks for view in chunk.tensor(name).unbind(0)]
            for name in self.tensor_names
        }
        return [{name: views[name][index] for name in self.tensor_names} for index in indices]

    def gather(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Templates at ``indices`` as ``[L, *shape]``: a hard route as one tensor op.

        Used under ``torch.compile`` so that a new route is a new input, not a recompile.
        """
        return {name: self.stacked(name).index_select(0, indices) for name in self.tensor_names}

    def mix(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mixed weights of every layer: ``W[l] = sum_k c[l, k] T[k]`` as ``[L, *shape]``.

        Args:
            coefficients: ``[L, K]`` (one coefficient per layer and template) or
                ``[L, K, num_tensors]`` (anisotropic: one per parameter tensor). ``K``
                may be smaller than the pool: a route sees the templates that existed
                when it was made, which keeps old tasks bit-identical after growth.
        """
        return self._mix(coefficients, self.tensor_names)

    def mix_lazily(
        self, coefficients: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``mix`` for a chunk of tasks run by ``run_grouped`` with ``group_size``,
        except that linear layers' weights stay their templates ``[K, *shape]``.

        Those layers mix their tasks' weights a few at a time just before the matmul
        that reads them (``modnet.grouped.GroupedLinear``), so the mixed weights are
        read from cache, not written to memory and read back: for 64 ViT-tiny tasks
        they are 1.4 GB per forward pass.

        Args:
            coefficients: ``[T, K]`` or ``[T, K, num_tensors]``, as ``mix``.

        Returns:
            The tensors for ``run_grouped`` and its ``mix`` argument (coefficients
            ``[T, K]`` of each linear layer mixed in place).
        """
        grouped = self.grouped
        in_place = {} if grouped is None else grouped.mixed_in_place
        count = coefficients.shape[1]
        weights = self._mix(coefficients, [n for n in self.tensor_names if n not in in_place])
        mix = {}
        for name, buffer in in_place.items():
            weights[name] = self.stacked(name, count)
            index = self.tensor_names.index(name)
            mix[buffer] = coefficients if coefficients.ndim == 2 else coefficients[:, :, index]
        return weights, mix

    def _mix(self, coefficients: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        layers, count = coefficients.shape[:2]
        mixed = {}
        # The mix runs in the templates' dtype, outside autocast: mixed norm parameters
        # must keep the dtype of the running statistics they are used with, and
        # autocast casts conv and linear weights itself where it lowers precision.
        with torch.autocast(coefficients.device.type, enabled=False):
            for g, name in enumerate(self.tensor_names):
                if name not in names:
                    continue
                templates = self.stacked(name, count)
                c = coefficients if coefficients.ndim == 2 else coefficients[:, :, g]
                # As a linear layer over the templates' transpose: for the few rows of
                # c and K of 4-16 this is an order of magnitude faster than ``c @ T``.
                flat = nn.functional.linear(c.to(templates.dtype), templates.reshape(count, -1).t())
                mixed[name] = flat.view(layers, *self.tensor_shapes[name])
        return mixed

    # -------------------------------------------------------------------- running
    def folding(self) -> FoldedRunner | None:
        """What runs the block with its BatchNorms folded into the convolutions before
        them, when that computes what the block computes now (eval mode, no autograd,
        see ``modnet.folding``); otherwise None."""
        folded = self.__dict__.get("_folded")
        if folded is None or not self.fold_batchnorm:
            return None
        return folded if folded.applies() else None

    def _tensors(self, weights: Mapping[str, torch.Tensor], stats: Mapping[str, torch.Tensor]):
        """Every tensor a run binds: the weights, the statistics, the shared buffers."""
        tensors = {**weights, **stats}
        for name in self.shared_buffer_names:
            tensors[name] = getattr(self, mangle(name))
        return tensors

    def run(
        self,
        x: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
        stats: Mapping[str, torch.Tensor],
        folded: bool = False,
    ) -> torch.Tensor:
        """Runs the block once with the given weights and per-task norm statistics.

        In inference (``folding()`` is not None) BatchNorms run folded into the
        convolution before them, which gives the same outputs within float rounding.

        Args:
            x: The layer's input.
            weights: One tensor per template tensor name (``mix`` for one layer).
            stats: The layer's running statistics.
            folded: ``weights`` were already folded by ``folding().fold`` (every
                layer at once); only valid while ``folding()`` is not None.
        """
        tensors = self._tensors(weights, stats)
        if folded:
            return self.__dict__["_folded"].run(tensors, x)
        folding = self.folding()
        if folding is not None:
            return folding(tensors, x)
        return self._binder(tensors, x)

    def run_grouped(
        self,
        x: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
        stats: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
        sample_weight: torch.Tensor,
        group_size: int | None = None,
        mix: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Runs the block once for a batch mixing tasks.

        In inference (``folding()`` is not None) BatchNorms run folded, as in ``run``.

        Args:
            x: Input batch ``[B, ...]``.
            weights: Every tensor of the block stacked per task, ``[T, *shape]``.
            stats: BatchNorm running statistics per task, ``[T, ...]``; updated in
                place in training mode for the tasks in the batch.
            ids: Task of every sample, ``[B]`` integers in ``[0, T)``.
            sample_weight: ``[B]``, 1 for samples whose route runs this layer, else 0
                (their statistics are left out; the caller keeps their input).
            group_size: Eager mode only: the batch holds the ``T`` tasks in order,
                ``group_size`` samples each (see ``GroupedRunner``).
            mix: With ``group_size``, coefficients of the linear layers whose weights
                in ``weights`` are still templates (``mix_lazily``); not with folding.
        """
        tensors = self._tensors(weights, stats)
        folding = self.folding()
        if folding is not None and folding.grouped is not None:  # every task's at once
            if mix:
                raise ValueError("folded BatchNorm needs mixed weights: call mix, not mix_lazily")
            folded = folding.fold(tensors)
            return folding.grouped(folded, ids, sample_weight, x, group_size=group_size)
        return self.grouped(tensors, ids, sample_weight, x, group_size=group_size, mix=mix)

    def run_shared(
        self,
        x: torch.Tensor,
        weights: Mapping[str, torch.Tensor],
        stats: Mapping[str, torch.Tensor],
        ids: torch.Tensor,
    ) -> torch.Tensor:
        """Runs the block once for a batch of tasks that share one weight set.

        Convolutions and matmuls run as in ``run``, one kernel for the whole batch;
        BatchNorm normalises every sample with its task's statistics, unfolded:
        folding each task's statistics into the shared convolutions would give every
        task its own weights again.

        Args:
            x: Input batch ``[B, ...]``.
            weights: One weight set, unstacked as ``run``'s: ``{name: w[u]}`` for row
                ``u`` of ``mix`` (a stacked ``[1, *shape]`` tensor would be read as
                per-task weights).
            stats: BatchNorm running statistics per task, ``[T, ...]``; updated in
                place in training mode for the tasks in the batch.
            ids: Task of every sample, ``[B]`` integers in ``[0, T)``.

        Returns:
            The block's output ``[B, ...]``, in ``x``'s dtype (or autocast's).

        Raises:
            TypeError: The block has a layer with parameters that has no grouped
                version (``grouped`` is ``None``).
        """
        if self.grouped is None:
            raise TypeError("this block has a layer without a grouped version: run tasks alone")
        tensors = self._tensors(weights, stats)
        return self.grouped(tensors, ids, x.new_ones(x.shape[0]), x)

    def build_block(self, weights: Mapping[str, torch.Tensor], stats: Mapping[str, torch.Tensor]):
        """A real, standalone block holding copies of ``weights`` and ``stats``."""
        reference = next(iter(weights.values()))
        block = copy.deepcopy(self._binder.module).to_empty(device=reference.device)
        with torch.no_grad():
            for name, value in {**weights, **stats}.items():
                target = block.get_parameter(name) if name in weights else block.get_buffer(name)
                target.copy_(value)
            for name in self.shared_buffer_names:
                block.get_buffer(name).copy_(getattr(self, mangle(name)))
        return block.to(reference.dtype)

    # --------------------------------------------------------------------- growth
    def grow(self, count: int, init: str | int = "random") -> range:
        """Appends ``count`` templates and returns their indices.

        Args:
            count: How many templates to add: a whole number >= 1 (an int, numpy or
                0-d tensor integer).
            init: ``"random"`` (a fresh block from ``block_factory``), ``"mean"`` (the
                mean of the existing templates) or the index of a template to copy:
                an integer, negative from the end of the whole pool as in Python
                (``-1`` is the newest template, whichever chunk holds it).

        The new templates train (``requires_grad``), as new PyTorch parameters do;
        on a model, ``ModularNet.grow`` also applies its last ``set_trainable``.

        Raises:
            ConfigError: ``count`` or ``init`` is not one of the above, or ``init``
                is not a template of the pool; checked before the pool changes, so
                a refused call leaves it as it was.
        """
        count = _whole_number(count, "count")
        if count < 1:
            raise ConfigError(f"grow needs count >= 1 (templates to add), got {count}")
        first = self.num_templates
        init = self._check_init(init)
        reference = self.chunks[0].tensor(self.tensor_names[0])
        if init == "random":
            if self.block_factory is None:
                raise ValueError(
                    "this pool has no block_factory, so it cannot make random templates: "
                    "grow with init='mean' or init=<template index>"
                )
            blocks = [self.block_factory() for _ in range(count)]
            stacked = self._stack(blocks)
        else:
            stacked = {}
            for name in self.tensor_names:
                if init == "mean":
                    source = self.stacked(name).detach().mean(0)
                else:
                    source = self.select(init)[name].detach()
                stacked[name] = source.unsqueeze(0).repeat(count, *([1] * source.ndim)).clone()
        stacked = {
            n: t.to(device=reference.device, dtype=reference.dtype) for n, t in stacked.items()
        }
        self.chunks.append(TemplateChunk(stacked))
        return range(first, self.num_templates)

    def _check_init(self, init: Any) -> str | int:
        """``grow``'s ``init`` as ``"random"``, ``"mean"`` or an index in ``[0, K)``.

        Why: a bool or a numpy integer must not reach tensor indexing (``True``
        indexes as a new axis and stacks a malformed chunk), and ``-1`` must mean the
        pool's last template, not the last of its first chunk.
        """
        if isinstance(init, str):
            if init not in ("random", "mean"):
                raise ConfigError(
                    f"unknown init {init!r}: use 'random', 'mean' or a template index"
                )
            return init
        index = _whole_number(init, "init", "'random', 'mean' or a template index")
        count = self.num_templates
        if not -count <= index < count:
            raise ConfigError(
                f"init={index} is not a template of the pool: it has {count} templates "
                f"(indices 0..{count - 1}, or -{count}..-1 from the end)"
            )
        return index % count


def _whole_number(value: Any, name: str, what: str = "a whole number") -> int:
    """``value`` as an int (ints, numpy and 0-d tensor integers); bools and floats refused."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise ConfigError(f"grow needs {name} as {what}, got {value!r}")
    return number
