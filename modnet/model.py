"""ModularNet: a trunk, a shared pool of templates, and per-task routes, norms and heads."""

from __future__ import annotations

import copy
import functools
import math
import numbers
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from . import drop_path as _drop_path
from . import features as _features
from . import mixed as _mixed
from .binding import TensorBinder, is_batchnorm_buffer
from .errors import ConfigError
from .families.base import PREPROCESSING_KEYS, Family
from .grouped import GroupedBatchNorm, GroupedRunner
from .norm_stats import TaskNormStats
from .route_checks import (
    HYPER_DEFAULTS,
    check_hard_route,
    check_hyper_options,
    check_route_options,
    coerce_route,
)
from .routing import (
    ROUTE_INITS,
    ROUTE_KINDS,
    HardRoute,
    HyperNetwork,
    HyperRoute,
    Route,
    RoutePlan,
    SoftRoute,
    check_loaded_indices,
)

TaskSpec = str | int | torch.Tensor | Sequence[str] | Sequence[int] | None
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def _check_route_construction(route: str, anisotropic: Any, route_init: Any) -> None:
    """Refuses route options that would do nothing or fail only at the first ``add_task``.

    Raises:
        ConfigError: ``anisotropic`` not a bool, or set with a hard route (which selects
            whole templates and has no coefficients); an unknown ``route_init``, or one
            other than the default with a hard or hypernetwork route (neither has
            logits to initialise).
    """
    if not isinstance(anisotropic, bool):
        raise ConfigError(f"anisotropic must be True or False, got {anisotropic!r}")
    if anisotropic and route == "hard":
        raise ConfigError(
            "anisotropic=True gives a soft route one coefficient per parameter tensor, and a "
            "hard route selects whole templates: leave anisotropic out, or choose a soft route"
        )
    if not isinstance(route_init, str) or route_init not in ROUTE_INITS:
        choices = ", ".join(ROUTE_INITS)
        raise ConfigError(f"unknown route_init {route_init!r}: choose one of {choices}")
    if route_init != "random" and route in ("hard", "hyper"):
        raise ConfigError(
            f"route_init={route_init!r} sets soft routes' initial logits, and the route is "
            f"{route}: choose a soft route or leave route_init out"
        )


class ModularNet(nn.Module):
    """An isometric network whose layers are routed, per task, through a template pool.

    Every layer position runs one block whose weights come from the pool: a view
    of one template (hard route) or a mix of templates (soft route). Each task owns
    a route, a classification head and its BatchNorm running statistics; templates,
    trunk and hypernetwork are shared.

    Args:
        family: Trunk and template pool (see ``modnet.families``).
        depth: Number of layer positions L. Hard routes may be shorter (skips).
        tasks: Task name to number of classes, in order; more can be added later.
        route: Default route of new tasks: ``"softmax"`` (convex mixing of
            templates), ``"linear"`` (free coefficients), ``"hyper"`` (a task
            embedding through a shared hypernetwork) or ``"hard"`` (layer l uses
            template l mod K).
        anisotropic: One coefficient per parameter tensor instead of per template.
        route_init: Initial soft-route logits: ``"random"``, ``"uniform"``, ``"cyclic"``.
        route_options: Options of new soft routes: ``temperature``, ``top_k``,
            ``straight_through`` (see ``SoftRoute``); softmax and sparsemax routes only.
        hyper_dim: Task-embedding size for ``route="hyper"`` (at least 1).
        hyper_hidden: Hidden width of the hypernetwork (0 for a linear map).
        hyper_normalize: ``"linear"``, ``"softmax"`` or ``"sparsemax"`` for hypernetwork
            coefficients. The three hypernetwork options keep their defaults with
            any other route.
        drop_path_rate: Stochastic depth (Huang et al. 2016, "Deep Networks with
            Stochastic Depth"): a float gives layer position ``l`` the rate
            ``drop_path_rate * l / (depth - 1)`` (timm's linear rule); a sequence
            gives one rate per layer position. The rate belongs to the position, not
            to the template, since a template can sit at several depths.

    Raises:
        ValueError: An unknown route kind, a depth below 1, hypernetwork options out
            of range or given to a route other than ``"hyper"`` (see
            ``check_hyper_options``), or drop-path rates that do not fit the depth or
            the block (``ConfigError``).

    Attributes:
        mixed_batches: How a batch mixing tasks runs: ``"auto"`` (default: ``"grouped"``
            under ``torch.compile``, else ``"chunked"``), ``"chunked"`` (layer by layer,
            tasks a few at a time, weights mixed just before use), ``"grouped"`` (every
            layer once for the whole batch, per-sample weights; fixed shapes) or
            ``"split"`` (task by task). See ``modnet.mixed``.
        default_precision: ``"fp32"`` or ``"bf16"``: the faster on CPU for this family,
            measured by ``bench/test_precision.py``; what ``precision="auto"`` trains in.
    """

    mixed_batches: str = "auto"
    # Whether every task's BatchNorm statistics stay put in training mode (see
    # ``freeze_norm_stats``), and else the only tasks whose statistics move (``None``:
    # all; set by ``set_trainable``).
    norm_stats_frozen: bool = False
    _norm_stats_tasks: frozenset[str] | None = None
    # The last ``set_trainable``'s parts (``None`` before any): what parameters made
    # later by ``grow`` and ``add_task`` follow.
    _trainable_parts: frozenset[str] | None = None

    def __init__(
        self,
        family: Family,
        depth: int,
        tasks: Mapping[str, int] | None = None,
        route: str = "softmax",
        anisotropic: bool = False,
        route_init: str = "random",
        hyper_dim: int = HYPER_DEFAULTS["hyper_dim"],
        hyper_hidden: int = HYPER_DEFAULTS["hyper_hidden"],
        hyper_normalize: str = HYPER_DEFAULTS["hyper_normalize"],
        drop_path_rate: float | Sequence[float] = 0.0,
        route_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if route not in ROUTE_KINDS:
            raise ValueError(f"unknown route kind {route!r}: choose one of {ROUTE_KINDS}")
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
            raise ConfigError(f"depth must be a whole number of layers >= 1, got {depth!r}")
        depth = int(depth)
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        _check_route_construction(route, anisotropic, route_init)
        if tasks is not None and not isinstance(tasks, Mapping):
            raise ConfigError(
                "tasks must map each task's name to its number of classes, e.g. "
                f"tasks={{'a': 10, 'b': 5}}; got a {type(tasks).__name__}: {tasks!r}"
            )
        hyper = dict(
            hyper_dim=hyper_dim, hyper_hidden=hyper_hidden, hyper_normalize=hyper_normalize
        )
        check_hyper_options(route, hyper)
        self.trunk = family.trunk
        self.pool = family.pool
        self.depth = depth
        self.route_kind = route
        self.route_options = dict(route_options or {})
        if self.route_options:
            check_route_options(route, self.route_options, self.pool.num_templates)
        self.anisotropic = anisotropic
        self.route_init = route_init
        self.num_features = self.trunk.num_features
        self.head_hidden_size = self.trunk.head_hidden_size
        self.grad_checkpointing = False
        self.drop_path_rates = _drop_path.layer_rates(drop_path_rate, depth)
        self._drop_paths = _drop_path.install(self.pool._binder.module, self.drop_path_rates)
        if self._drop_paths:  # the grouped copy of the block gets the same drop-path slots
            self.pool.__dict__["_grouped"] = GroupedRunner.build(self.pool._binder.module, True)
        grouped = self.pool.grouped
        self._grouped_drop_paths = [
            m for m in (grouped.module.modules() if grouped else []) if isinstance(m, DropPath)
        ]
        self.default_precision = family.default_precision
        self.config: dict[str, Any] = dict(
            family.config,
            depth=depth,
            route=route,
            anisotropic=anisotropic,
            route_init=route_init,
            hyper_dim=hyper_dim,
            hyper_hidden=hyper_hidden,
            hyper_normalize=hyper_normalize,
        )
        if self.route_options:
            self.config["route_options"] = dict(self.route_options)
        if any(self.drop_path_rates):
            self.config["drop_path_rate"] = (
                drop_path_rate if isinstance(drop_path_rate, float) else list(drop_path_rate)
            )
        groups = self.pool.num_tensors if anisotropic else 1
        self.hypernet = None
        if route == "hyper":
            self.hypernet = HyperNetwork(
                hyper_dim, depth, self.pool.num_templates, groups, hyper_hidden, hyper_normalize
            )
        trunk_stats = [
            n for n, _ in self.trunk.named_buffers() if is_batchnorm_buffer(self.trunk, n)
        ]
        self._trunk_binder = TensorBinder(self.trunk, trunk_stats, follow_replacement=True)
        # Per-task trunk statistics of mixed-task batches (built here, not in a compiled call).
        self.__dict__["_grouped_trunk"] = (
            GroupedRunner.build(self.trunk, per_task=False) if trunk_stats else None
        )
        self.__dict__["_grouped_trunk_resolutions"] = self._trunk_binder.resolutions
        self.routes = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        self.norm_stats = nn.ModuleDict()
        self._family_normalization = {
            key: _per_channel(getattr(family, key), self.trunk.in_chans) for key in ("mean", "std")
        }
        self.task_normalization: dict[str, dict[str, tuple[float, ...]]] = {}
        # The task normalisation pretrained_cfg took last: replaced once no task gives it.
        self._cfg_task_normalization: dict[str, tuple[float, ...]] | None = None
        self._pretrained_cfg: dict[str, Any] = {
            key: getattr(family, key) for key in PREPROCESSING_KEYS
        }
        self._refresh_pretrained_cfg()
        for name, num_classes in (tasks or {}).items():
            self.add_task(name, num_classes)

    # ------------------------------------------------------------------ tasks
    @property
    def task_names(self) -> list[str]:
        """Task names in the order they were added (per-sample task ids index this list)."""
        return list(self.heads.keys())

    @property
    def num_classes(self) -> int:
        """Classes of the first task (timm's single-head convention).

        0 when the model has no task or the first task's head was removed with
        ``reset_classifier(0)`` (its forward then returns pooled features).
        """
        return _head_classes(self.heads[self.task_names[0]]) if self.heads else 0

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in a layer's output (class, registers), as
        timm's ViT names them; 0 for feature maps."""
        return self.trunk.num_prefix_tokens

    @property
    def task_classes(self) -> dict[str, int]:
        """Classes per task; 0 for a task whose forward returns pooled features."""
        return {name: _head_classes(head) for name, head in self.heads.items()}

    def add_task(
        self,
        name: str,
        num_classes: int,
        route: Route | Sequence[int] | torch.Tensor | None = None,
        init_from: str | None = None,
    ) -> None:
        """Adds a task: a new route, head and norm statistics. Existing tasks are untouched.

        Args:
            name: Task name (letters, digits, ``_`` and ``-``).
            num_classes: Size of the task's classifier; 0 for no classifier (the
                task's forward returns pooled features ``[B, head_hidden_size]``).
            route: A route, a list of template indices, or a coefficient tensor;
                default: a new route of the model's ``route`` kind. The model keeps
                its own copy: later changes to ``route`` do not reach the task. The
                route, head and norm statistics take the model's device and dtype
                (e.g. float64 after ``model.double()``), whatever ``route``'s were.
            init_from: Copy the route and norm statistics of this existing task.

        After ``set_trainable`` the new task is not among the tasks it named: its
        route and head start frozen (``requires_grad=False``) and its statistics
        held, as every other unnamed task's; call ``set_trainable`` naming it to
        train it. Before any ``set_trainable`` they train, as new PyTorch modules do.

        Raises:
            ValueError: An invalid or taken name, ``num_classes`` not a whole number
                ``>= 0``, or a route that does not fit the pool or the depth (a
                ``HyperRoute`` also the model's hypernetwork: its ``embed_dim``,
                ``hyper_templates`` and ``num_tensors``, or a model without one), or
                whose coefficients hold nan or inf. Nothing is added then.
            KeyError: ``init_from`` names no task.
        """
        self._check_new_task_name(name)
        num_classes = _class_count(num_classes, name)
        self.trunk.check_global_pool(classifier=num_classes > 0)
        if init_from is not None:
            self._task(init_from)
        if route is not None:
            new_route = coerce_route(self, route, name)
        elif init_from is not None:
            new_route = copy.deepcopy(self.routes[init_from])
        else:
            new_route = self._default_route()
        if init_from is not None:
            stats = copy.deepcopy(self.norm_stats[init_from])
        else:
            stats = TaskNormStats(self.depth, self.pool.initial_stats, self._initial_trunk_stats())
        head = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        reference = self._reference_tensor()
        # Route, statistics and head take the templates' dtype: a float32 route in a
        # float64 model fails in the hypernetwork and rounds soft-route logits.
        self.routes[name] = new_route.to(reference.device, reference.dtype)
        self.norm_stats[name] = stats.to(reference.device, reference.dtype)
        self.heads[name] = head.to(reference.device, reference.dtype)
        if self._trainable_parts is not None:  # not among the tasks set_trainable named
            self.routes[name].requires_grad_(False)
            self.heads[name].requires_grad_(False)
        self._refresh_pretrained_cfg()

    def set_route(self, task: str, route: Route | Sequence[int] | torch.Tensor) -> None:
        """Replaces a task's route.

        Args:
            route: A list or 1-D integer tensor of template indices (a hard route:
                any length up to ``depth``, repeats allowed), a float coefficient
                tensor ``[L, K]`` or ``[L, K, G]`` (a linear soft route starting
                there), or a ``Route``.
                A hard route of the same length as the current one is updated in
                place, so a compiled model runs it without recompiling. The model
                keeps its own copy: later changes to ``route`` do not reach the task.
                It takes the model's device and dtype, as in ``add_task``.

        Raises:
            KeyError: ``task`` is unknown.
            ValueError: The route does not fit the pool or the depth (a ``HyperRoute``
                also the model's hypernetwork, as in ``add_task``), or its coefficients
                hold nan or inf; the task keeps its route then.
        """
        self._task(task)
        new = coerce_route(self, route, task)
        current = self.routes[task]
        if isinstance(current, HardRoute) and isinstance(new, HardRoute):
            if current.depth == new.depth:
                current.assign(new)  # in place: no recompile under torch.compile
                return
        reference = self._reference_tensor()
        self.routes[task] = new.to(reference.device, reference.dtype)

    def grow(self, count: int, task: str | None = None, init: str | int = "random") -> range:
        """Adds ``count`` templates to the pool and returns their indices.

        Existing routes keep seeing only the templates they were made with, so every
        existing task's output stays bit-for-bit the same. Tasks added afterwards see
        all templates; ``task`` widens that one task's route to the new templates.

        The new templates follow the last ``set_trainable``: they train if it trained
        ``templates`` or ``new_templates``, else they start frozen. Before any
        ``set_trainable`` they train, as new PyTorch parameters do.

        Args:
            count: Templates to add (a whole number >= 1).
            task: A task whose route widens to the new templates; the coefficients
                added for them train if the route's did.
            init: ``"random"``, ``"mean"`` or the index of a template to copy, negative
                from the end of the whole pool as in Python (see ``TemplatePool.grow``).

        Raises:
            KeyError: ``task`` is unknown.
            ValueError: ``count`` not a whole number >= 1, or an ``init`` that is not
                ``"random"``, ``"mean"`` or a template of the pool (``ConfigError``).
                Checked before anything changes: a refused call leaves the model as
                it was.
        """
        if task is not None:
            self._task(task)  # before the pool changes: a failed call changes nothing
        new = self.pool.grow(count, init=init)
        parts = self._trainable_parts
        if parts is not None and not parts & {"templates", "new_templates"}:
            self.pool.chunks[-1].requires_grad_(False)
        if task is not None:
            self._widen_route(task)
        return new

    def export(self, task: str) -> nn.Module:
        """The task's network with its route baked in: plain blocks, no pool.

        Raises:
            KeyError: ``task`` is unknown.
        """
        from .export import ExportedNet

        return ExportedNet.from_modular(self, task)

    # ------------------------------------------------------------ timm interface
    def get_classifier(self, task: str | None = None) -> nn.Module:
        """The task's head: ``nn.Linear(head_hidden_size, classes)``, or ``nn.Identity``.

        Raises:
            KeyError: ``task`` is unknown.
            ValueError: Several tasks and no ``task``.
        """
        return self.heads[self._single_task(task)]

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, task: str | None = None
    ) -> None:
        """Replaces a task's head with a fresh one of ``num_classes`` outputs (timm API).

        Args:
            num_classes: Outputs of the new head; 0 removes the head, so the task's
                forward returns pooled features ``[B, head_hidden_size]`` and
                ``num_classes`` reads 0.
            global_pool: A new pooling of the trunk, shared by all tasks (e.g.
                ``"avg"``, ``"max"``, ``""`` for none); ``None`` keeps it. A pooling
                that changes the head's input width is refused while other tasks
                keep heads of the old width.
            task: The task (optional when the model has one task).

        Raises:
            KeyError: ``task`` is unknown.
            ValueError: Several tasks and no ``task``, or an unsupported pooling.
        """
        name = self._single_task(task)
        num_classes = _class_count(num_classes, name)
        if global_pool is not None:
            others = [h for n, h in self.heads.items() if n != name]
            headed = num_classes > 0 or any(isinstance(h, nn.Linear) for h in others)
            self.trunk.check_global_pool(global_pool, classifier=headed)
            self._set_global_pool(global_pool, name)
        reference = self._reference_tensor()
        head = nn.Linear(self.head_hidden_size, num_classes) if num_classes else nn.Identity()
        self.heads[name] = head.to(reference.device, reference.dtype).train(self.training)
        self._refresh_pretrained_cfg()

    def forward_features(
        self, x: torch.Tensor, task: TaskSpec = None, route: Any = None
    ) -> torch.Tensor:
        """Features after the final norm, before pooling (timm's convention).

        Args:
            x: Images ``[B, C, H, W]``.
            task: As in ``forward``.
            route: As in ``forward``.

        Returns:
            ``[B, C, H', W']`` for conv trunks, ``[B, N, C]`` tokens for ViT-style ones.
        """
        self._check_input(x)
        if route is not None:
            name, plan = self._override(task, route)
            return self._features(x, name, plan)
        return self._dispatch(
            x, task, self._features, pad=False, grouped=lambda h, g: _mixed.features(self, h, g)
        )

    def forward_head(
        self, x: torch.Tensor, task: TaskSpec = None, pre_logits: bool = False
    ) -> torch.Tensor:
        """Pooling and the task's classifier, applied to ``forward_features`` output.

        Args:
            x: ``forward_features`` output of the same task.
            task: As in ``forward``.
            pre_logits: Return the pooled features ``[B, head_hidden_size]`` instead
                of the logits ``[B, num_classes]``.

        Raises:
            ValueError: ``x`` is a batch of input images (the model's input size), not
                ``forward_features`` output.
        """
        input_size = getattr(self, "pretrained_cfg", {}).get("input_size")
        if input_size and x.ndim == 4 and tuple(x.shape[1:]) == tuple(input_size):
            raise ValueError(
                f"forward_head takes forward_features output, got a batch of input images "
                f"{tuple(x.shape)}: call model(x, task) for logits, or "
                "model.forward_head(model.forward_features(x, task), task)"
            )
        return self._dispatch(
            x,
            task,
            lambda h, t: self._head(h, t, pre_logits),
            pad=not pre_logits,
            grouped=lambda h, g: _mixed.head(self, h, g, pre_logits),
        )

    def forward(self, x: torch.Tensor, task: TaskSpec = None, route: Any = None) -> torch.Tensor:
        """Logits for ``task``: a name, an index, or one task per sample.

        With one task per sample, the batch runs as set by ``mixed_batches``; under
        ``torch.compile`` every layer runs once for the whole batch with each
        sample's weights taken from its task's route (shapes never depend on the
        mix of tasks, so ``torch.compile`` does not recompile when it changes);
        BatchNorm normalises each task's samples with that task's statistics. The
        result equals running each task's samples alone. Logits are as wide as the
        model's task with the most classes (whichever tasks the batch holds); tasks
        with fewer classes get ``-inf`` in the extra columns.

        Args:
            x: Images ``[B, C, H, W]`` in the model's dtype.
            task: A task name or index (a Python or numpy integer; optional with one
                task), or per-sample task ids (a 1-D integer tensor or a list of
                names/indices, length ``B``; an empty batch gives empty logits).
            route: Runs this call with another route instead of the task's own, and
                changes no state (for trying block orders, in the spirit of
                x-transformers' execution order as a forward argument): a list of
                template indices, a coefficient tensor ``[L, K]``/``[L, K, G]``
                (gradients flow into it) or a ``Route``. Needs a single task, whose
                head and norm statistics are used (in training mode BatchNorm still
                updates that task's running statistics, as any training forward does).

        Returns:
            Logits ``[B, num_classes]`` (float: the model's dtype, or autocast's); pooled features
            ``[B, head_hidden_size]`` for a task without a head.

        Raises:
            ValueError: A wrong input shape, an integer input or a float dtype other
                than the weights' (or autocast's), an unknown task index, a batch
                mixing tasks without heads with tasks with heads, or a route that
                does not fit the model. Per-sample ids are checked in eager mode
                only (reading them would break a compiled graph, where a bad id
                fails as an ``IndexError``); ``ConfigError`` for a route with per-sample
                tasks.
            KeyError: An unknown task name.
        """
        self._check_input(x)
        if route is not None:
            name, plan = self._override(task, route)
            return self._head(self._features(x, name, plan), name, False)
        return self._dispatch(
            x,
            task,
            lambda h, t: self._head(self._features(h, t), t, False),
            pad=True,
            grouped=lambda h, g: _mixed.head(self, _mixed.features(self, h, g), g, False),
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before any child loads: a refused state dict leaves the model unchanged.
        self._check_loaded_routes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check_loaded_routes(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Runs ``set_route``'s check on every hard route a state dict would load.

        Why: ``load_state_dict`` copies the indices as they are; an index past the
        pool or a route longer than the depth otherwise fails only at the next
        forward, as an ``IndexError`` far from its cause.

        Raises:
            ConfigError: The key, the task and what the route accepts, in one line.
        """
        for task, current in self.routes.items():
            key = f"{prefix}routes.{task}.indices"
            if not isinstance(current, HardRoute) or key not in state_dict:
                continue
            value = state_dict[key]
            check_loaded_indices(value, None, key)
            try:
                check_hard_route(self, HardRoute(value, current.num_templates), task)
            except ValueError as error:
                raise ConfigError(f"{key} in the state dict: {error}") from None

    # ------------------------------------------------------------------- modes
    def freeze_norm_stats(self, frozen: bool = True) -> ModularNet:
        """Keeps BatchNorm on its running statistics even in training mode.

        Why: when only a route may change (route-only transfer or adaptation), the
        statistics must not drift with the training batches either.

        This is modnet's way to freeze running statistics. timm's
        ``timm.utils.model.freeze`` swaps only the BatchNorm modules registered in
        the model, the trunk's (stem and final norm), for ``FrozenBatchNorm2d``:
        the routed layers' BatchNorm lives in the template pool's block skeleton,
        which timm cannot see, so their per-task statistics keep moving in
        training mode after ``freeze(model)``.

        A frozen task's forward in training mode normalises with its running
        statistics, as in eval mode (dropout and drop path still train).

        Args:
            frozen: True to freeze every task's statistics, False to let every
                task's move. Either way this replaces the choice of tasks that
                ``set_trainable(..., "norm")`` made.

        Returns:
            The model.
        """
        self.norm_stats_frozen = frozen
        self._norm_stats_tasks = None
        return self.train(self.training)

    def train(self, mode: bool = True) -> ModularNet:
        super().train(mode)
        grouped_trunk = self.__dict__.get("_grouped_trunk")
        if grouped_trunk is not None:
            grouped_trunk.module.train(mode)
        if mode and self.norm_stats_frozen:
            for module in self._batch_norms():
                module.eval()
        return self

    def _batch_norms(self) -> list[nn.Module]:
        """Every BatchNorm that runs with a task's statistics: trunk, block skeletons
        (plain and grouped) and the trunk's grouped copy."""
        grouped_trunk = self.__dict__.get("_grouped_trunk")
        skeletons = [*self.pool.skeletons()] + ([grouped_trunk.module] if grouped_trunk else [])
        modules = [*self.trunk.modules(), *(m for s in skeletons for m in s.modules())]
        return [
            m for m in modules if isinstance(m, (nn.modules.batchnorm._BatchNorm, GroupedBatchNorm))
        ]

    def _holds_statistics(self, task: str) -> bool:
        """Whether ``task``'s statistics stay put in this call while others move.

        True only in training mode, after ``set_trainable`` let other tasks' statistics
        move but not this task's (``freeze_norm_stats(True)`` holds every task's
        through the modules' mode instead).
        """
        chosen = self._norm_stats_tasks
        return chosen is not None and self.training and task not in chosen

    def _with_statistics_held(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with every BatchNorm in eval mode: the statistics of a task that
        ``set_trainable`` did not name are used, not updated (as ``freeze_norm_stats``)."""
        if self._trunk_binder.names:
            self._current_grouped_trunk()  # a rebuild resets modes: done before, not within
        moving = [m for m in self._batch_norms() if m.training]
        for module in moving:
            module.training = False
        try:
            return fn(*args)
        finally:
            for module in moving:
                module.training = True

    # -------------------------------------------------------------- parameters
    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, for separate learning rates or freezing."""
        return {
            "templates": list(self.pool.parameters()),
            "trunk": list(self.trunk.parameters()),
            "routes": list(self.routes.parameters())
            + (list(self.hypernet.parameters()) if self.hypernet is not None else []),
            "heads": list(self.heads.parameters()),
        }

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters that belong to one task alone: its route and head."""
        self._task(task)
        return list(self.routes[task].parameters()) + list(self.heads[task].parameters())

    TRAINABLE_PARTS = (
        "templates",
        "new_templates",
        "trunk",
        "stem",
        "routes",
        "hypernet",
        "heads",
        "norm",
    )
    # what "all" trains ("hypernet" only where the routes come from one)
    ALL_PARTS = frozenset({"templates", "trunk", "routes", "hypernet", "heads", "norm"})

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that weight decay must not touch (timm's contract).

        Decided by role, on each template's own shape rather than the stacked
        ``[K, ...]`` one: norm affine parameters and biases of the templates and of
        the trunk, whatever the trunk's timm model excludes (``pos_embed``,
        ``cls_token``), every route and the hypernetwork. Heads decay their weights.
        ``timm.optim.create_optimizer_v2(model, weight_decay=...)`` reads this and
        groups the model as modnet's trainer does, and as it groups ``export(task)``.

        Returns:
            Full parameter names, e.g. ``"pool.chunks.0.bn1__weight"``.
        """
        names = {n for n, _ in self.routes.named_parameters(prefix="routes")}
        if self.hypernet is not None:
            names |= {n for n, _ in self.hypernet.named_parameters(prefix="hypernet")}
        for index, chunk in enumerate(self.pool.chunks):
            for name, (attr, _) in zip(chunk.names, chunk.named_parameters(), strict=True):
                if len(self.pool.tensor_shapes[name]) <= 1 or name.endswith("bias"):
                    names.add(f"pool.chunks.{index}.{attr}")
        for prefix, module in self.trunk.named_modules(prefix="trunk"):
            if callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{prefix}.{n}" for n in module.no_weight_decay()}
        names |= {n for n, p in self.trunk.named_parameters(prefix="trunk") if p.ndim <= 1}
        return names | {n for n, _ in self.heads.named_parameters(prefix="heads") if "bias" in n}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by position for timm's layer-wise decay and freezing.

        A template serves every depth, so all templates form one group of blocks
        (``coarse`` changes nothing); the trunk's embedding comes first; what no
        pattern names (routes, hypernetwork, final norm, heads) comes last.

        So timm's layer-wise learning-rate decay (``create_optimizer_v2(model,
        layer_decay=...)``) gives three scales: embedding, every template, the
        rest. The templates are stacked in one tensor per block parameter, so a
        model made by ``from_timm`` cannot give its block ``i`` the scale timm gives
        block ``i`` of the source network (the per-depth recipe of BEiT/MAE
        fine-tuning); fine-tune the source network with timm for that.
        """
        return dict(
            stem=r"^trunk\.(?:stem|model\.(?:patch_embed|cls_token|reg_token|pos_embed|stem))",
            blocks=r"^pool\.",
        )

    def set_trainable(
        self,
        tasks: str | Sequence[str],
        parts: str | Sequence[str],
        first_new_chunk: int | None = None,
    ) -> ModularNet:
        """Sets ``requires_grad`` so that only ``parts`` of ``tasks`` train; returns self.

        Frozen tensors get no gradient at all, so their values stay bit-identical.

        Args:
            tasks: A task name or names: whose routes, heads and statistics train.
            parts: Names from ``TRAINABLE_PARTS`` (a list, or one comma-separated
                string; singular ``route``/``head``/``template`` and ``all`` accepted).
                ``norm`` lets the tasks' BatchNorm statistics update in training mode;
                without it they stay frozen. ``stem`` is the trunk's embedding only;
                ``new_templates`` the pool's chunks from ``first_new_chunk`` on.

        Raises:
            ConfigError: An unknown part, no part, ``new_templates`` without growth,
                or ``hypernet`` named for a model whose routes no hypernetwork makes.
            KeyError: An unknown task.

        The choice holds for parameters made later: templates from ``grow`` train
        only with ``templates`` or ``new_templates``, and a task from ``add_task``
        (not among ``tasks``) starts frozen; call ``set_trainable`` again to change
        that.

        With ``norm``, only ``tasks``' statistics move in training mode; every other
        task's forward uses its running statistics and leaves them as they are, as
        after ``freeze_norm_stats()`` (which, like ``freeze_norm_stats(False)``,
        replaces this choice for all tasks).
        """
        tasks = [tasks] if isinstance(tasks, str) else list(tasks)
        items = parts.split(",") if isinstance(parts, str) else list(parts)
        aliases = {"route": "routes", "head": "heads", "template": "templates"}
        wanted = {aliases.get(p.strip(), p.strip()) for p in items if p.strip()}
        if "all" in wanted:
            wanted = (wanted - {"all"}) | self.ALL_PARTS
        unknown = sorted(wanted - set(self.TRAINABLE_PARTS))
        if unknown or not wanted:
            choices = ", ".join(self.TRAINABLE_PARTS)
            problem = f"unknown part {unknown[0]!r} to train" if unknown else "nothing to train"
            raise ConfigError(f"{problem}: choose from {choices}, all (e.g. route,head)")
        if "new_templates" in wanted and first_new_chunk is None:
            raise ConfigError("new_templates can train only after growing the pool (--grow N)")
        # "all" (or every part listed) means the parts the model has
        if "hypernet" in wanted and self.hypernet is None and not self.ALL_PARTS <= wanted:
            raise ConfigError(
                "part 'hypernet' to train: this model has no hypernetwork (its routes are "
                f"{self.route_kind!r}); train its routes instead (e.g. route,head)"
            )
        for task in tasks:
            self._task(task)
        self.requires_grad_(False)
        chunks = list(self.pool.chunks)
        start = 0 if "templates" in wanted else first_new_chunk
        for chunk in chunks[start:] if start is not None else []:
            chunk.requires_grad_(True)
        if "trunk" in wanted:
            self.trunk.requires_grad_(True)
        for param in self.trunk.stem_parameters() if "stem" in wanted else []:
            param.requires_grad_(True)
        for task in tasks:
            self.routes[task].requires_grad_("routes" in wanted)
            self.heads[task].requires_grad_("heads" in wanted)
        if "hypernet" in wanted and self.hypernet is not None:
            self.hypernet.requires_grad_(True)
        self.freeze_norm_stats("norm" not in wanted)
        if "norm" in wanted:
            self._norm_stats_tasks = frozenset(tasks)
        self._trainable_parts = frozenset(wanted)
        return self

    # ----------------------------------------------------------------- internals
    def _features(
        self,
        x: torch.Tensor,
        task: str,
        plan: RoutePlan | None = None,
        keep: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        stats = self.norm_stats[task]
        x = self._trunk_stage("embed", x, stats)
        x = self._routed_layers(x, task, plan, keep)
        return self._trunk_stage("norm", x, stats)

    def _routed_layers(
        self,
        x: torch.Tensor,
        task: str,
        plan: RoutePlan | None = None,
        keep: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The routed layers of one task (between the trunk's embed and norm stages)."""
        if self._holds_statistics(task):
            return self._with_statistics_held(self._run_routed_layers, x, task, plan, keep)
        return self._run_routed_layers(x, task, plan, keep)

    def _run_routed_layers(
        self,
        x: torch.Tensor,
        task: str,
        plan: RoutePlan | None,
        keep: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        stats = self.norm_stats[task]
        if plan is None:
            plan = self.routes[task].plan(self.hypernet)
        folding = self.pool.folding()
        if plan.indices is not None and folding is None:
            for layer, weights in enumerate(self.pool.select_many(plan.indices)):
                x = self._run_layer(x, layer, weights, stats)
                if keep is not None:
                    keep.append(x)
        else:
            if plan.coefficients is not None:
                weights = self.pool.mix(plan.coefficients)
            else:
                weights = self.pool.gather(plan.template_indices(x.device))
            if folding is not None:  # every layer's BatchNorms folded at once
                depth = plan.depth
                stacked = {n: stats.layer_stack(n)[:depth] for n in folding.stat_names}
                weights = folding.fold({**weights, **stacked})
            # One unbind per tensor: its backward stacks the layers' gradients in one op.
            layers = {name: w.unbind(0) for name, w in weights.items()}
            for layer in range(plan.depth):
                layer_weights = {name: w[layer] for name, w in layers.items()}
                x = self._run_layer(x, layer, layer_weights, stats, folding is not None)
                if keep is not None:
                    keep.append(x)
        return x

    def _head(self, x: torch.Tensor, task: str, pre_logits: bool) -> torch.Tensor:
        x = self._trunk_stage("pre_logits", x, self.norm_stats[task])
        return x if pre_logits else self.heads[task](x)

    def _trunk_stage(self, stage: str, x: torch.Tensor, stats: TaskNormStats) -> torch.Tensor:
        if not self._trunk_binder.names:
            return self.trunk(x, stage)
        chosen = self._norm_stats_tasks
        if chosen is not None and self.training:
            if not any(self.norm_stats[t] is stats for t in chosen if t in self.norm_stats):
                return self._with_statistics_held(self._trunk_binder, stats.trunk(), x, stage)
        return self._trunk_binder(stats.trunk(), x, stage)

    def _dispatch(
        self,
        x: torch.Tensor,
        task: TaskSpec,
        fn: Callable[[torch.Tensor, str], torch.Tensor],
        pad: bool,
        grouped: Callable[[torch.Tensor, _mixed.TaskGroups], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        single = self._resolve_single(task)
        if single is not None:
            return fn(x, single)
        ids = self._task_ids(task, x.shape[0], x.device)
        if grouped is not None and ids.shape[0] and _mixed.mode(self) != "split":
            groups = _mixed.task_groups(self, ids)
            held = [self._holds_statistics(name) for name in groups.names]
            if all(held):
                return self._with_statistics_held(grouped, x, groups)
            if any(held):
                return self._grouped_by_statistics(x, ids, groups, held, grouped)
            return grouped(x, groups)
        # per task: held by _routed_layers and _trunk_stage
        return _mixed.split(self, x, ids, fn, pad)

    def _grouped_by_statistics(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        groups: _mixed.TaskGroups,
        held: list[bool],
        grouped: Callable[[torch.Tensor, _mixed.TaskGroups], torch.Tensor],
    ) -> torch.Tensor:
        """A mixed batch as two: tasks whose statistics move, then those held.

        Why: BatchNorm's mode is one per module, so one grouped call cannot update
        some tasks' statistics and only read others'. Each sample's result is still
        that of its task's samples alone.
        """
        rows_held = torch.tensor(held, device=ids.device)[groups.ids]
        outputs, order = [], []
        for hold in (False, True):
            rows = (rows_held == hold).nonzero().squeeze(1)
            part = _mixed.task_groups(self, ids[rows])
            run = self._with_statistics_held if hold else (lambda fn, *args: fn(*args))
            outputs.append(run(grouped, x[rows], part))
            order.append(rows)
        return torch.cat(outputs)[torch.argsort(torch.cat(order))]

    def _resolve_single(self, task: TaskSpec) -> str | None:
        if task is None:
            return self._single_task(None)
        if isinstance(task, str):
            return self._task(task)
        if isinstance(task, bool):
            raise ValueError(f"task must be a name or an integer index, got {task!r}")
        if isinstance(task, numbers.Integral):
            task = operator.index(task)  # a Python or numpy integer
            names = self.task_names
            if not 0 <= task < len(names):
                raise ValueError(f"task index {task} is out of range: the tasks are {names}")
            return names[task]
        return None

    def _task_ids(self, task: Any, batch: int, device: torch.device) -> torch.Tensor:
        names = self.task_names
        if not torch.is_tensor(task) and hasattr(task, "__array__"):
            task = torch.as_tensor(task)  # a numpy array of ids
        if torch.is_tensor(task):
            if task.dtype.is_floating_point or task.dtype == torch.bool or task.ndim != 1:
                raise ValueError(
                    "a per-sample task tensor must be 1-D integer task ids, "
                    f"got dtype {task.dtype} and shape {tuple(task.shape)}"
                )
            ids = task.to(device=device, dtype=torch.long)
        else:
            if not isinstance(task, Iterable) or isinstance(task, (bytes, dict)):
                raise ValueError(
                    f"task must be a name, an integer index, or one name or index per sample, "
                    f"got {type(task).__name__} {task!r}"
                )
            task = list(task)
            for t in task:  # not silently truncated or read as 0/1
                if isinstance(t, bool) or not isinstance(t, (str, numbers.Integral)):
                    raise ValueError(
                        f"per-sample tasks must be task names or integer indices, got {t!r}"
                    )
            ids = torch.tensor(
                [names.index(self._task(t)) if isinstance(t, str) else int(t) for t in task],
                dtype=torch.long,
                device=device,
            )
        if ids.shape[0] != batch:
            raise ValueError(f"got {ids.shape[0]} task ids for a batch of {batch} samples")
        if torch.compiler.is_compiling():
            return ids  # checked in eager mode only: reading values would break the graph
        if batch and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
            raise ValueError(
                f"task ids must lie in [0, {len(names)}): the tasks are {names}, "
                f"got ids from {int(ids.min())} to {int(ids.max())}"
            )
        return ids

    def _single_task(self, task: str | None) -> str:
        if task is not None:
            return self._task(task)
        names = self.task_names
        if len(names) == 1:
            return names[0]
        if not names:
            raise ValueError(
                "this model has no tasks yet: add one with model.add_task(name, classes), "
                "or create it with num_classes=N (one task, 'default') or tasks={name: "
                "classes}"
            )
        raise ValueError(f"this model has several tasks {names}: pass task=<name>")

    def _task(self, name: str) -> str:
        if name not in self.heads:
            raise KeyError(
                f"unknown task {name!r}: the model's tasks are {self.task_names}; "
                f"add it with model.add_task({name!r}, num_classes)"
            )
        return name

    def _check_new_task_name(self, name: str) -> None:
        if not isinstance(name, str) or not _TASK_NAME.match(name):
            raise ValueError(
                f"invalid task name {name!r}: use letters, digits, '_' and '-', "
                "starting with a letter or digit"
            )
        if name in self.heads:
            raise ValueError(f"task {name!r} already exists: choose another name")
        if hasattr(nn.ModuleDict(), name):
            raise ValueError(f"task name {name!r} is reserved by PyTorch's ModuleDict: rename it")

    def _check_input(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x) or x.ndim != 4:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"expected a batch of images [B, C, H, W], got {shape}")
        if not x.dtype.is_floating_point:
            raise ValueError(
                f"expected float images, got dtype {x.dtype}: convert them, e.g. "
                "(x.float() / 255 - mean) / std with the task's normalisation"
            )
        dtype = self._reference_tensor().dtype
        device = x.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if x.dtype not in (dtype, autocast):
            within = f" (torch.autocast runs {autocast})" if autocast else ""
            fix = "" if autocast else ", or run under torch.autocast for mixed precision"
            raise ValueError(
                f"the input is {x.dtype} but the model's weights are {dtype}{within}: pass "
                f"x.to({dtype}){fix}"
            )
        channels = self.trunk.in_chans
        if x.shape[1] != channels:
            raise ValueError(
                f"expected {channels}-channel images, got {x.shape[1]} channels "
                f"(input shape {tuple(x.shape)}): convert the images (e.g. repeat grayscale "
                f"to RGB) or build the model with in_chans={x.shape[1]}"
            )
        size = self.trunk.img_size
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            raise ValueError(
                f"expected {size[0]}x{size[1]} images, got {x.shape[-2]}x{x.shape[-1]} "
                f"(input shape {tuple(x.shape)}): resize the input or build the model with "
                f"img_size={_size_option(x.shape[-2], x.shape[-1])}"
            )

    def _default_route(self) -> Route:
        count = self.pool.num_templates
        groups = self.pool.num_tensors if self.anisotropic else 1
        if self.route_kind == "hard":
            return HardRoute([layer % count for layer in range(self.depth)], count)
        if self.route_kind == "hyper":
            return HyperRoute(
                self.hypernet.embed_dim, self.depth, count, self.hypernet.num_templates, groups
            )
        route = SoftRoute(self.depth, count, groups, self.route_kind, self.route_init)
        return route.configured(**self.route_options) if self.route_options else route

    def _widen_route(self, task: str) -> None:
        route = self.routes[task]
        count = self.pool.num_templates
        if isinstance(route, HardRoute):
            route.num_templates = count
            return
        added = count - route.num_templates
        if added <= 0:
            return
        if isinstance(route, SoftRoute):
            old = route.logits.detach()
            fill_shape = (old.shape[0], added, *old.shape[2:])
            if route.normalize != "linear":
                fill = old.mean(dim=1, keepdim=True).expand(fill_shape)
            else:
                fill = old.new_zeros(fill_shape)
            trains = route.logits.requires_grad  # the widened route trains as it did
            route.logits = nn.Parameter(torch.cat([old, fill], dim=1), requires_grad=trains)
        elif isinstance(route, HyperRoute):
            old = route.extra.detach() if route.extra is not None else None
            trains = (route.extra if route.extra is not None else route.embedding).requires_grad
            shape = (self.depth, added, self.pool.num_tensors) if self.anisotropic else None
            zeros = self._reference_tensor().new_zeros(shape or (self.depth, added))
            extra = zeros if old is None else torch.cat([old, zeros], dim=1)
            route.extra = nn.Parameter(extra, requires_grad=trains)
        route.num_templates = count

    def _current_grouped_trunk(self) -> GroupedRunner | None:
        """The trunk's grouped copy for mixed-task batches, as its modules are now.

        After a trunk module was swapped (``timm.layers.convert_sync_batchnorm``,
        ``timm.utils.model.freeze``) the copy is built again; it is ``None`` (the
        batch then runs task by task) when a module holding statistics has no
        grouped version, as timm's ``FrozenBatchNorm2d``, which never updates them.
        """
        binder = self._trunk_binder
        binder.current()
        if self.__dict__["_grouped_trunk_resolutions"] != binder.resolutions:
            runner = GroupedRunner.build(self.trunk, per_task=False)
            owners = {name.rpartition(".")[0] for name in binder.names}
            if runner is not None and not owners <= set(runner.replaced):
                runner = None
            self.__dict__["_grouped_trunk"] = runner
            self.__dict__["_grouped_trunk_resolutions"] = binder.resolutions
            self.train(self.training)
        return self.__dict__["_grouped_trunk"]

    def _initial_trunk_stats(self) -> dict[str, torch.Tensor]:
        if not self._trunk_binder.names:
            return {}
        # A task's own copy is complete even where a swapped-in module (timm's
        # FrozenBatchNorm2d) lacks a statistic; values as reset_running_stats sets them.
        if self.norm_stats:
            reference = self.norm_stats[self.task_names[0]].trunk()
        else:
            reference = {n: self.trunk.get_buffer(n) for n in self._trunk_binder.names}
        fill = {"running_var": 1}
        return {
            name: torch.full_like(value, fill.get(name.rpartition(".")[2], 0))
            for name, value in reference.items()
        }

    def _reference_tensor(self) -> torch.Tensor:
        return self.pool.chunks[0].tensor(self.pool.tensor_names[0])

    # ------------------------------------------------- timm contract and task lifecycle
    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's data config of the model: input size, mean/std, interpolation, names.

        ``mean``/``std`` are what the first task was trained with when known (a
        checkpoint records each task's normalisation, see ``set_normalization``),
        else the family's defaults; ``timm.data.resolve_data_config(model=model)``
        reads them. ``interpolation``, ``crop_pct`` and ``crop_mode`` are the
        family's: ``"bilinear"``, ``1.0`` and ``"center"`` for modnet's own, the
        source model's for ``from_timm``, so timm's eval transform gives both the
        same pixels. ``num_classes`` is the model's: its first task's classes (0 for
        none). ``default_cfg`` is the same dict (timm's older name).
        """
        return self._pretrained_cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: Mapping[str, Any]) -> None:
        self._pretrained_cfg = dict(cfg)
        self._refresh_pretrained_cfg()

    default_cfg = pretrained_cfg

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One entry per layer position: ``num_chs``, ``reduction`` and ``module`` (timm)."""
        return _features.feature_info(self)

    def set_normalization(self, task: str, mean: Sequence[float], std: Sequence[float]) -> None:
        """Records the per-channel mean/std that ``task``'s inputs are normalised with.

        Checkpoints carry it (``io.save_model`` reads it from each task's transform);
        ``pretrained_cfg`` follows the first task.

        Raises:
            KeyError: ``task`` is unknown.
            ValueError: ``mean``/``std`` do not have one value per input channel, a
                value is not finite, or a std is not positive (inputs are divided by it).
        """
        self._task(task)
        channels = self.trunk.in_chans
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(
                f"mean and std need {channels} values (one per input channel), got "
                f"{len(mean)} and {len(std)}"
            )
        values = [float(v) for v in (*mean, *std)]
        if not all(math.isfinite(v) for v in values) or min(float(s) for s in std) <= 0:
            raise ConfigError(
                f"std must be positive and mean and std finite (inputs become (x - mean) / "
                f"std), got mean {tuple(mean)} and std {tuple(std)}"
            )
        self.task_normalization[task] = {
            "mean": tuple(float(m) for m in mean),
            "std": tuple(float(s) for s in std),
        }
        self._refresh_pretrained_cfg()

    def delete_task(self, name: str) -> None:
        """Removes a task's route, head, norm statistics and normalisation: ``add_task``'s inverse.

        Every other task's parameters, buffers and outputs stay bit-identical; shared
        templates, trunk and hypernetwork are untouched.

        Raises:
            KeyError: ``name`` is unknown.
        """
        self._task(name)
        del self.routes[name], self.heads[name], self.norm_stats[name]
        self.task_normalization.pop(name, None)
        if self._norm_stats_tasks is not None:  # a later task of that name is not chosen
            self._norm_stats_tasks = self._norm_stats_tasks - {name}
        self._refresh_pretrained_cfg()

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: modnet models are not scriptable.

        Routing picks tensors per task at run time (Python dicts, per-call routes),
        which TorchScript cannot type; tracing, export and compile handle it.

        Raises:
            TypeError: Always, naming what works instead.
        """
        raise TypeError(
            "modnet models cannot be scripted with torch.jit.script (routing is dynamic "
            "Python): use torch.jit.trace(model, x) or torch.export for one task, "
            "model.export(task) for a plain timm network, or torch.compile"
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes each layer's activations in the backward pass instead of storing them.

        Outputs and gradients are the same as without it (BatchNorm running
        statistics are updated once, dropout and drop-path draw the same numbers);
        peak memory of training drops. Method: Chen et al. 2016, "Training Deep Nets
        with Sublinear Memory Cost", via ``torch.utils.checkpoint`` (non-reentrant).
        """
        self.grad_checkpointing = bool(enable)

    def set_batchnorm_folding(self, enable: bool = True) -> ModularNet:
        """Whether inference runs each block's BatchNorms folded into their convolutions.

        On by default: in eval mode without autograd (``torch.no_grad``,
        ``torch.inference_mode``) a conv family block then runs as three
        convolutions with a bias, and its BatchNorms' passes over the activations
        are saved (``modnet_conv_tiny`` on one CPU core, folded against unfolded in
        the same process: 1.15x at batch 1, 1.35x at 16 and 64;
        ``bench/test_batchnorm_folding.py``). Outputs agree with
        the unfolded block within float rounding (about 1e-6 relative in fp32);
        turn it off where outputs must be bit-identical to a plain timm network.
        Training, and anything that records gradients, never folds. See
        ``modnet.folding``.

        Args:
            enable: Fold (True) or run every BatchNorm as it is (False).

        Returns:
            The model, for chaining.
        """
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be True or False, got {enable!r}")
        self.pool.fold_batchnorm = enable
        return self

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        task: str | int | None = None,
        route: Any = None,
        return_prefix_tokens: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Per-layer outputs of one task's route (timm's ``forward_intermediates``).

        Args:
            x: Images ``[B, C, H, W]``.
            indices: Layer positions to return: ``None`` all, an int ``n`` the last
                ``n``, a sequence of positions (negative from the end).
            norm: Apply the final norm to every returned output.
            stop_early: Accepted for timm compatibility; all layers run.
            output_fmt: ``"NCHW"`` (maps ``[B, C, H', W']``; tokens without prefix
                tokens, reshaped to the patch grid) or ``"NLC"`` (``[B, N, C]``).
            intermediates_only: Return only the list.
            task: One task (name or index; optional with one task).
            route: A route override, as in ``forward``.
            return_prefix_tokens: For token models with prefix tokens (class,
                registers), each intermediate becomes ``(spatial, prefix)``, the
                prefix ``[B, num_prefix_tokens, C]``, as timm's ViT returns them.
                Models without prefix tokens return the plain list, as timm does.

        Returns:
            ``(forward_features(x), intermediates)`` or only ``intermediates``.

        Raises:
            ValueError: Per-sample tasks, an unknown format, or indices out of range.
        """
        return _features.forward_intermediates(
            self,
            x,
            indices,
            norm,
            output_fmt,
            intermediates_only,
            task,
            route,
            return_prefix_tokens,
        )

    def _override(self, task: TaskSpec, route: Any) -> tuple[str, RoutePlan]:
        """The single task and the plan of a per-call route (no state changes)."""
        single = self._resolve_single(task)
        if single is None:
            raise ConfigError(
                "a route override applies to one task: pass task=<name> (not one task per "
                "sample) together with route="
            )
        if isinstance(route, Route):
            coerce_route(self, route, single)  # validates; the caller's route itself runs
            return single, route.plan(self.hypernet)
        if torch.is_tensor(route) and route.dtype.is_floating_point:
            shape = tuple(route.shape)
            count = self.pool.num_templates
            tensors = (1, self.pool.num_tensors)
            if (
                route.ndim not in (2, 3)
                or shape[0] != self.depth
                or not 1 <= shape[1] <= count
                or (route.ndim == 3 and shape[2] not in tensors)
            ):
                raise ConfigError(
                    f"route coefficients must be [{self.depth}, K] or [{self.depth}, K, "
                    f"{self.pool.num_tensors}] with K <= {count} templates, got {shape}"
                )
            return single, RoutePlan(coefficients=route)
        hard = HardRoute(route, self.pool.num_templates)
        check_hard_route(self, hard, single)
        return single, hard.plan(self.hypernet)

    def _run_layer(
        self,
        x: torch.Tensor,
        layer: int,
        weights: Mapping[str, torch.Tensor],
        stats: TaskNormStats,
        folded: bool = False,
    ) -> torch.Tensor:
        """Layer position ``layer``: its drop-path rate, checkpointing, its statistics
        (``folded``: ``weights`` have the BatchNorms folded in, see ``TemplatePool.run``)."""
        run = functools.partial(self.pool.run, folded=True) if folded else self.pool.run
        if self._drop_paths:
            run = _drop_path.at_rate(run, self._drop_paths, self.drop_path_rates[layer])
        layer_stats = stats.layer(layer)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return _features.checkpointed(run, x, weights, layer_stats)
        return run(x, weights, layer_stats)

    def _set_global_pool(self, global_pool: str, task: str) -> None:
        width = self.trunk.pool_width(global_pool)
        others = [n for n, h in self.heads.items() if n != task and isinstance(h, nn.Linear)]
        if width != self.head_hidden_size and others:
            raise ConfigError(
                f"global_pool={global_pool!r} changes the head input from "
                f"{self.head_hidden_size} to {width} features, but tasks {others} keep heads "
                "of the old width: reset their classifiers too, or pick a pooling of the "
                "same width"
            )
        self.trunk.set_global_pool(global_pool)
        self.head_hidden_size = width
        self.config["global_pool"] = global_pool
        if self.config.get("family") == "vit":
            # timm's reset_classifier keeps the final norm before or after the pooling
            # as built; a rebuild from global_pool alone could choose the other place.
            self.config["fc_norm"] = not isinstance(self.trunk.model.fc_norm, nn.Identity)

    def _refresh_pretrained_cfg(self) -> None:
        cfg = self._pretrained_cfg
        size = self.trunk.img_size
        cfg["input_size"] = (self.trunk.in_chans, *(size or (224, 224)))
        cfg["fixed_input_size"] = size is not None
        first = self.task_names[0] if len(self.heads) else None
        channels = self.trunk.in_chans
        taken = self._cfg_task_normalization
        stale = taken is not None and all(tuple(cfg.get(k) or ()) == taken[k] for k in taken)
        self._cfg_task_normalization = None
        if first in self.task_normalization:
            cfg.update(self.task_normalization[first])
            self._cfg_task_normalization = dict(self.task_normalization[first])
        elif stale or any(len(cfg.get(k) or ()) != channels for k in ("mean", "std")):
            # a deleted or reordered first task's values, or none of the right length
            cfg.update(self._family_normalization)
        cfg["pool_size"] = self.trunk.feature_size(cfg["input_size"][1:])
        cfg["first_conv"] = "trunk." + self.trunk.first_conv
        cfg["classifier"] = f"heads.{first or 'default'}"
        cfg["num_classes"] = self.num_classes


def _size_option(height: int, width: int) -> str:
    return str(height) if height == width else f"({height}, {width})"


def _class_count(num_classes: Any, task: str) -> int:
    """``num_classes`` as an int; a float, bool or negative count is refused."""
    try:
        count = None if isinstance(num_classes, bool) else operator.index(num_classes)
    except TypeError:  # int, numpy or 0-d tensor integers have __index__
        count = None
    if count is None:
        raise ValueError(
            f"task {task!r} needs num_classes as a whole number >= 0, got {num_classes!r}"
        )
    if count < 0:
        raise ValueError(f"task {task!r} needs num_classes >= 0, got {count}")
    return count


def _head_classes(head: nn.Module) -> int:
    return head.out_features if isinstance(head, nn.Linear) else 0


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """One value per input channel (a constant default repeats to any channel count)."""
    values = tuple(float(v) for v in values)
    if len(values) != channels and len(set(values)) == 1:
        return values[:1] * channels
    return values
