"""``adapt``: a new, unlabelled domain as a new route over a trained pool.

The compositional-models claim (Zhmoginov et al. 2021): a domain shift can be
absorbed by changing only the order and mixing of pretrained modules. The
target gets its own task (route, head and statistics initialised from the
sources), trained without target labels; the pool and the heads stay frozen
unless asked otherwise. The target's labelled test split is used only to
report source-only and adapted accuracy side by side.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import io
from ..data import DataError, TaskData, portable_spec
from ..data.registry import PATH_READERS
from ..errors import ConfigError
from ..model import ModularNet
from ..plot import route_matrix, save_run_figures
from ..train import RunDirError, TrainConfig, evaluate, load_data, parse_parts
from ..train.api import changed_training_options, check_resume_options, outputs_missing, train
from ..train.distributed import broadcast_state, init_distributed
from ..train.parts import changed_shared, check_shared, present_parts, shown
from ..train.tracking import MetricsLogger
from .errors import AdaptationError
from .norm import batchnorm_modules, reestimate_norm_stats
from .objectives import check_objective_options, make_objective, objective_class, objective_names
from .relation import route_relation, save_relation_heatmap
from .selection import NEAREST, source_distances
from .target import AVERAGE, add_target_task, check_init
from .trainer import AdaptationTrainer

TARGET_PARTS = frozenset({"routes", "heads", "norm"})  # owned by the target task alone


@dataclass
class AdaptResult:
    """What an adaptation produced; accuracies are on the target's labelled test split.

    Attributes:
        source_only: Per source, the target evaluated with that source's route,
            head and statistics: the model before any adaptation.
        start_accuracy: The target task as initialised (``init``), before adaptation.
        accuracy: The adapted target.
        source_accuracy: Each source on its own test split after adaptation.
        trained_parameters: Model parameters that adaptation trained.
        auxiliary_parameters: Parameters of the objective itself (a discriminator),
            trained and then discarded.
        adapted_statistics: Norm-statistic values re-estimated for the target.
        loss_trace: The objective's value per step (``norm_stats``: the statistics
            gap per batch, see ``reestimate_norm_stats``).
        relation: How the target's route relates to the sources' (``route_relation``).
        curve: ``{"step", "accuracy"}`` points of the target's accuracy on a fixed
            test sample as adaptation proceeds (``curve_every``; empty if not asked,
            and after a resumed run only the points measured since it resumed).
    """

    model: ModularNet
    target: str
    sources: list[str]
    objective: str
    parts: list[str]
    source_only: dict[str, float]
    start_accuracy: float
    accuracy: float
    source_accuracy: dict[str, float]
    trained_parameters: int
    auxiliary_parameters: int
    adapted_statistics: int
    loss_trace: list[float]
    relation: dict[str, Any]
    run_dir: Path
    checkpoint: Path | None
    init: str = AVERAGE
    figure: Path | None = None
    is_main: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def best_source_only(self) -> float:
        """The best single source on the target (picked with target labels: an upper baseline)."""
        return max(self.source_only.values())


def adapt(
    run_dir: str | Path,
    target: str,
    sources: Sequence[str] | str | None = None,
    objective: str = "moments",
    parts: str | Sequence[str] = "route",
    init: str = AVERAGE,
    head_init: str | None = None,
    config: TrainConfig | None = None,
    objective_options: Mapping[str, Any] | None = None,
    source_weight: float = 1.0,
    train_sources: bool | TrainConfig = False,
    overwrite: bool = False,
    preloaded: Mapping[str, TaskData] | None = None,
    anisotropic: bool = False,
    curve_every: int = 0,
    curve_sample: int = 500,
    update_shared: bool = False,
) -> AdaptResult:
    """Adapts a trained pool to an unlabelled target domain; saves it as one more task.

    Args:
        run_dir: A run directory whose tasks include the sources; the target is
            saved into it, usable by ``eval``, ``routes`` and ``export``.
        target: Dataset spec of the target domain (same classes as the sources).
        sources: Source task names in the run (a list or ``"a,b"``); default:
            every task with the target's number of classes.
        objective: The name of a registered objective (``modnet.adapt.OBJECTIVES``,
            listed by ``objective_names()``; see ``modnet.adapt.objectives``). The
            target's features are compared
            with those of the sources its head comes from (``head_init``): each
            source's features are shaped for its own head.
        parts: What trains, of the target's ``route``, ``head``, ``norm``
            (statistics) and the shared ``stem``, ``templates``, ``trunk``;
            ``"route"`` is the paper's claim. With ``norm`` the target's
            statistics are first re-estimated on its images.
        init: Where the target's route and statistics start: ``"average"`` of
            the sources, ``"nearest"`` (the source whose features the target's
            images match best, chosen without labels; see ``selection``) or a
            source's name.
        head_init: Where its head starts (default: like ``init``).
        config: Training options; ``batch_size`` is per domain, an epoch is a
            pass over the target's training images, limits apply to every domain.
        objective_options: Keyword options of the objective (e.g. ``diversity``),
            checked against the types and ranges it declares before any work.
        source_weight: Weight of the sources' supervised loss when shared parts train.
        train_sources: If the run directory holds no run yet, train the sources
            (then dataset specs) first: ``True`` with ``config``, or a config.
        overwrite: Adapt again when the run already has the target task.
        preloaded: Datasets already loaded with the same options, by spec, used
            instead of loading them again (several objectives on one set of
            domains: some datasets take seconds to parse).
        anisotropic: The target's route gets one coefficient per block tensor
            (``[L, K, G]``, see ``add_target_task``).
        curve_every: Also measure the target's accuracy every this many steps
            (and before the first) on the first ``curve_sample`` test images;
            kept in ``AdaptResult.curve`` and the results entry. 0: never.
        curve_sample: Test images of the target that ``curve_every`` evaluates (>= 1).
        update_shared: Let ``parts`` name what every task shares (``stem``,
            ``templates``, ``trunk``): the sources and the run's other tasks then
            change too, and the accuracies recorded for them are from before.

    Raises:
        ConfigError: A bad option, or a shared part without ``update_shared``.
        AdaptationError: An unknown objective, or an objective option it does not
            take or with a bad value (checked before any work).
    """
    config = config or TrainConfig()
    if (
        isinstance(source_weight, bool)
        or not isinstance(source_weight, (int, float))
        or not (math.isfinite(source_weight) and source_weight >= 0)
    ):
        raise ConfigError(f"--source-weight must be a finite number >= 0, got {source_weight!r}")
    _check_count("curve_every", curve_every, 0, "0: no accuracy curve")
    _check_count("curve_sample", curve_sample, 1, "the test images the curve scores")
    objective_cls = objective_class(objective)
    objective_options = check_objective_options(objective, objective_options)
    wanted = _check_parts(parse_parts(parts), objective_cls.uses_gradients, objective)
    check_shared(wanted, update_shared)
    run_dir = Path(run_dir)
    ctx = init_distributed(config.device)
    _latest_or_train(run_dir, sources, train_sources, config)
    with io.open_run(run_dir, "modnet adapt", enabled=ctx.is_main):
        return _adapt(
            run_dir, target, sources, objective, wanted, init, head_init, config,
            objective_options, source_weight, overwrite, preloaded, ctx, anisotropic,
            (curve_every, curve_sample),
        )  # fmt: skip


def _adapt(
    run_dir, target, sources, objective, wanted, init, head_init, config, objective_options,
    source_weight, overwrite, preloaded, ctx, anisotropic=False, curve=(0, 0),
) -> AdaptResult:  # fmt: skip
    objective_cls = objective_class(objective)
    latest, state = io.run_state(run_dir, repair=ctx.is_main)
    if io.unfinished_phase(state) is not None and "adapt" not in state:
        io.refuse_other_phase(run_dir, state, "adapt")
    model, manifest = io.load_model(latest)
    wanted = present_parts(wanted, model)
    _check_norm(wanted, model, objective_cls)
    plan = _resumable_plan(state, target)
    resuming = plan is not None
    if resuming:  # an interrupted adaptation of this target continues as it was started
        asked = dict(
            objective=objective,
            objective_options=dict(objective_options or {}),
            parts=sorted(wanted),
            init_rule=init,
            source_weight=source_weight,
            anisotropic=anisotropic,
        )
        if sources is not None:
            asked["sources"] = _as_list(sources)
        check_resume_options(
            run_dir, f"adapt of {target}", json.loads(state["config"]), config, plan, asked
        )
    if plan is None:  # named sources are checked before any data is read
        _check_source_names(model, _as_list(sources))
    loader = _Loader(model, config, preloaded)
    target_data = _load_target(target, loader)
    name = target_data.name
    phase = f"adapt-{name}"
    io.refuse_other_phase(run_dir, state, phase)
    if _finished_without_results(run_dir, state, phase, latest, target, config):
        return _complete_outputs(run_dir, phase, model, name, state, ctx)
    if plan is None and name in model.task_names:
        _refuse_other_data(run_dir, manifest, name, target, overwrite)
    labelled = (
        plan is None
        and name in model.task_names
        and "adapted_from" not in manifest["tasks"].get(name, {})
    )
    source_names = _pick_sources(model, sources, target_data, plan, labelled)
    if plan is None and name in model.task_names:
        if not overwrite:
            raise RunDirError(
                f"{run_dir} already has a task {name!r}: pass --overwrite (overwrite=True) "
                "to adapt it again"
            )
        keep = [t for t in model.task_names if t != name]
        model, _ = io.load_model(latest, tasks=keep)
    source_data = _load_sources(source_names, manifest, loader)
    # The target's training labels are dropped here: nothing downstream can read them.
    unlabelled = dataclasses.replace(target_data, train_y=torch.zeros_like(target_data.train_y))
    if plan is None:
        plan = _start(
            model, name, target, source_data, unlabelled, objective, objective_options,
            wanted, init, head_init, source_weight, config, ctx, anisotropic,
        )  # fmt: skip
    parts_set = frozenset(plan["parts"])
    info = _task_info(manifest, model, source_names, target, target_data, objective, parts_set)
    adapted_statistics = _count_statistics(model, name) if "norm" in parts_set else 0
    if objective_cls.uses_gradients:
        model.set_trainable(name, sorted(parts_set))
        broadcast_state(model, ctx)
        torch.manual_seed(config.seed)
        module = make_objective(
            objective, model.num_features, len(source_names), **plan["objective_options"]
        )
        trainer = AdaptationTrainer(
            model,
            source_data,
            unlabelled,
            module,
            config,
            run_dir,
            phase,
            ctx,
            info,
            adapt_norm="norm" in parts_set,
            source_weight=plan["source_weight"],
            matched=source_names if plan["head_init"] == AVERAGE else [plan["head_init"]],
            resume_state=state if resuming else None,
            extra_manifest={k: v for k, v in manifest.items() if k == "model_name"},
            extra_state={"adapt": plan},
            curve_every=curve[0],
            curve_sample=curve[1],
        )
        accuracy = trainer.fit()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        auxiliary = sum(p.numel() for p in module.parameters())
        trace = trainer.loss_trace
        curve_points = trainer.curve
    else:
        accuracy = evaluate(
            model,
            {**source_data, name: target_data},
            config.eval_batch_size,
            ctx.device,
            micro_batch=config.resolved_eval_micro_batch(),
        )
        if ctx.is_main:
            io.save_checkpoint(
                run_dir,
                f"{phase}-step{len(plan['norm_gaps']):07d}",
                model,
                task_info=info,
                extra={k: v for k, v in manifest.items() if k == "model_name"},
            )
        trained, auxiliary, trace = 0, 0, list(plan["norm_gaps"])
        curve_points = []
    return _finish(
        run_dir, phase, model, name, source_names, plan, accuracy, trained, auxiliary,
        adapted_statistics, trace, ctx, curve_points,
    )  # fmt: skip


def _finish(
    run_dir, phase, model, name, source_names, plan, accuracy, trained, auxiliary,
    adapted_statistics, trace, ctx, curve=(),
) -> AdaptResult:  # fmt: skip
    """The result of a finished adaptation, with its figures and results entry written."""
    start = torch.tensor(plan["start"])
    model.requires_grad_(False)
    model.freeze_norm_stats(False)
    model.eval()
    relation = route_relation(model, name, source_names, start)
    result = AdaptResult(
        model=model,
        target=name,
        sources=source_names,
        objective=plan["objective"],
        parts=sorted(plan["parts"]),
        source_only=plan["source_only"],
        start_accuracy=plan["start_accuracy"],
        accuracy=accuracy[name],
        source_accuracy={s: accuracy[s] for s in source_names},
        trained_parameters=trained,
        auxiliary_parameters=auxiliary,
        adapted_statistics=adapted_statistics,
        loss_trace=trace,
        relation=relation,
        run_dir=run_dir,
        checkpoint=io.latest_checkpoint(run_dir),
        init=plan["init"],
        is_main=ctx.is_main,
        extra={k: plan.get(k) for k in ("init_rule", "source_distances", "start")},
        curve=list(curve),
    )
    if ctx.is_main:
        result.figure = save_relation_heatmap(
            model, name, source_names, run_dir / _heatmap_name(phase), start
        )
        save_run_figures(model, run_dir)
        # The outdated marks go first: once the results are written the phase is complete.
        changed_shared(run_dir, phase, plan["parts"], [n for n in model.task_names if n != name])
        _record(run_dir, phase, result, plan)
    return result


def _complete_outputs(run_dir, phase, model, name, state, ctx) -> AdaptResult:
    """Results and figures of an adaptation that was stopped after its last checkpoint.

    The loss trace and accuracy curve come from the checkpoint's trainer state, so the
    results entry is the one an uninterrupted adaptation writes.
    """
    plan = json.loads(state["adapt"])
    history = json.loads(state.get("history", "[]"))
    parts = frozenset(plan["parts"])
    model.set_trainable(name, sorted(parts))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    module = make_objective(
        plan["objective"], model.num_features, len(plan["sources"]), **plan["objective_options"]
    )
    auxiliary = sum(p.numel() for p in module.parameters())
    statistics = _count_statistics(model, name) if "norm" in parts else 0
    result = _finish(
        run_dir, phase, model, name, list(plan["sources"]), plan, history[-1]["accuracy"],
        trained, auxiliary, statistics, json.loads(state.get("loss_trace", "[]")), ctx,
        json.loads(state.get("curve", "[]")),
    )  # fmt: skip
    if ctx.is_main:
        # the run holds this attempt's weights (a kill may have beaten the trainer's mark)
        MetricsLogger(run_dir, phase).checkpointed(int(state.get("step", 0)))
        io.run.note(f"{phase} had finished training; wrote its missing results in {run_dir}")
    return result


# ------------------------------------------------------------------------ checks
def _check_count(name: str, value: Any, low: int, meaning: str) -> None:
    """Refuses an integer option of ``adapt`` that is not an integer >= ``low``.

    Raises:
        ConfigError: Naming the option, its valid values and the value given.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low} ({meaning}), got {value!r}")


def _check_parts(wanted: frozenset[str], uses_gradients: bool, objective: str) -> frozenset[str]:
    if not uses_gradients:
        if wanted - {"routes", "norm"}:
            raise AdaptationError(
                f"the {objective!r} objective only re-estimates the target's norm statistics "
                f"and trains nothing, but --train asks for {', '.join(sorted(wanted))}: drop "
                f"--train or choose a gradient objective ({_gradient_objectives()})"
            )
        return frozenset({"norm"})
    if not wanted - {"norm"}:
        raise AdaptationError(
            "--train norm alone trains no parameter: use --objective norm_stats to only "
            "re-estimate statistics, or train the route too (--train route,norm)"
        )
    return wanted


def _check_norm(wanted: frozenset[str], model: ModularNet, objective) -> None:
    """Refuses to re-estimate BatchNorm statistics of a model that has none (a ViT).

    Raises:
        AdaptationError: With the fix: ``--train`` without ``norm``, or a gradient
            objective instead of a statistics-only one.
    """
    if "norm" not in wanted or batchnorm_modules(model):
        return
    lacking = "this model has no BatchNorm statistics to re-estimate (e.g. a ViT with LayerNorm)"
    if not objective.uses_gradients:
        raise AdaptationError(
            f"the {objective.name!r} objective only re-estimates BatchNorm statistics, but "
            f"{lacking}: use a gradient objective ({_gradient_objectives()}) instead"
        )
    raise AdaptationError(
        f"--train {shown(wanted)}: {lacking}: drop norm from --train "
        f"(--train {shown(wanted - {'norm'})})"
    )


def _gradient_objectives() -> str:
    """The registered objectives that take gradient steps, for error messages."""
    return ", ".join(objective_names(uses_gradients=True))


def _latest_or_train(
    run_dir: Path,
    sources: Sequence[str] | str | None,
    train_sources: bool | TrainConfig,
    config: TrainConfig,
) -> Path:
    latest = io.latest_checkpoint(run_dir) if io.is_run_dir(run_dir) else None
    if latest is not None:
        return latest
    _refuse_other_folder(run_dir)
    if train_sources is False:
        raise RunDirError(
            f"{run_dir} holds no trained run: train the sources first (`modnet train --tasks "
            f"SOURCE,SOURCE --out {run_dir}`; in Python, adapt(..., train_sources=True) does it)"
        )
    specs = _as_list(sources)
    if not specs:
        raise AdaptationError("train_sources needs the sources' dataset specs: pass sources=[...]")
    base = train_sources if isinstance(train_sources, TrainConfig) else config
    train(dataclasses.replace(base, tasks=specs), run_dir)
    return io.latest_checkpoint(run_dir)


def _refuse_other_folder(run_dir: Path) -> None:
    """Refuses a folder that is not a run and that training cannot make one: a saved
    model, a checkpoint of a run, or someone else's files.

    Raises:
        RunDirError: Saying what the folder is and which folder adapt needs.
    """
    if io.is_run_dir(run_dir) or not run_dir.exists():
        return
    run = io.run_root(run_dir)
    if run != run_dir and io.is_run_dir(run):
        raise RunDirError(
            f"{run_dir} is a checkpoint folder of the run {run}, not a run directory: adapt "
            f"adds the target to a run, so give the run directory (`modnet adapt {run} ...`), "
            "which adapts from the run's latest checkpoint"
        )
    if (run_dir / io.MANIFEST).is_file():
        raise RunDirError(
            f"{run_dir} is a saved model (a model directory, as io.save_model writes), not a "
            "run directory: adapt adds the target to a run, so give the run directory that "
            "`modnet train --out` wrote (the one the model comes from)"
        )
    try:
        io.check_run_target(run_dir)
    except RunDirError:
        raise RunDirError(
            f"{run_dir} is not a modnet run directory (it holds other files): give the run "
            "directory that `modnet train --out` wrote"
        ) from None


def _finished_without_results(run_dir, state, phase, latest, target, config) -> bool:
    if (
        state is None
        or state.get("phase") != phase
        or not state.get("done")
        or "adapt" not in state
    ):
        return False
    if json.loads(state["adapt"]).get("target_spec") != target:
        return False
    stored = json.loads(state.get("config", "{}"))
    missing = outputs_missing(run_dir, phase, latest, [_heatmap_name(phase)])
    return missing and not changed_training_options(stored, config)


def _heatmap_name(phase: str) -> str:
    """The file of the route-relation heatmap that ``_finish`` draws for ``phase``."""
    return f"{phase}-routes.png"


def _resumable_plan(state: Mapping[str, Any] | None, target: str) -> dict[str, Any] | None:
    if state is None or state.get("done", True) or "adapt" not in state:
        return None
    plan = json.loads(state["adapt"])
    return plan if plan.get("target_spec") == target else None


class _Loader:
    """``load_data`` that takes datasets from ``preloaded`` when they are there."""

    def __init__(self, model: ModularNet, config: TrainConfig, preloaded) -> None:
        self.model, self.config, self.preloaded = model, config, dict(preloaded or {})

    def __call__(self, spec: str) -> TaskData:
        if spec in self.preloaded:
            return self.preloaded[spec]
        return next(iter(load_data([spec], self.model, self.config).values()))


def _load_target(target: str, loader: _Loader) -> TaskData:
    try:
        return loader(target)
    except DataError as error:
        raise DataError(
            f"cannot load the target domain {target!r}: adaptation learns from its unlabelled "
            f"training images and reports accuracy on its test split. {error}"
        ) from None


def _as_list(sources: Sequence[str] | str | None) -> list[str]:
    if sources is None:
        return []
    items = sources.split(",") if isinstance(sources, str) else list(sources)
    return [s.strip() for s in items if s.strip()]


def _pick_sources(
    model: ModularNet,
    sources: Sequence[str] | str | None,
    target: TaskData,
    plan,
    labelled: bool = False,
) -> list[str]:
    """The source task names: the plan's, those named, or every task with the target's classes.

    ``labelled``: the target is a task the run learned with labels (refused here,
    before looking for sources, so that the refusal names the actual problem).
    """
    if plan is not None:
        return list(plan["sources"])
    names = _as_list(sources)
    if target.name in names:
        raise AdaptationError(
            f"the target {target.name!r} is also a source: adaptation needs a new domain whose "
            "labels it does not use; choose another --target or drop it from --sources"
        )
    if labelled:
        raise AdaptationError(
            f"the target {target.name!r} is a task the run learned with labels: adaptation "
            "needs a new domain; choose another --target"
        )
    if not names:
        others = [t for t in model.task_names if t != target.name]
        names = [t for t in others if model.task_classes[t] == target.num_classes]
        if not names:
            raise AdaptationError(_no_shared_label_space(model, others, target))
    _check_source_names(model, names)
    for source in names:
        if model.task_classes[source] != target.num_classes:
            raise AdaptationError(
                f"the source {source!r} has {model.task_classes[source]} classes but the target "
                f"{target.name!r} has {target.num_classes}: sources and target must share one "
                "label space"
            )
    return names


def _refuse_other_data(
    run_dir: Path, manifest: Mapping[str, Any], name: str, spec: str, overwrite: bool
) -> None:
    """Refuses a target from other data than the run's task of the same name.

    A file or folder task takes its file's or folder's name, so another dataset can
    come under the name of a task the run has. Only the same data is a task the run
    learned with labels (``_pick_sources``) or one to adapt again (``overwrite``).

    Raises:
        AdaptationError: Naming both datasets and how to rename the target.
    """
    entry = manifest["tasks"].get(name, {})
    recorded = entry.get("dataset")
    if recorded is None or (overwrite and "adapted_from" in entry):
        return
    if not (_is_path_spec(spec) or _is_path_spec(recorded)) or portable_spec(spec) == recorded:
        return
    rename = ""
    if _is_path_spec(spec):
        scheme, _, rest = spec.strip().partition(":")
        path = Path(rest)
        if path.name not in ("", ".", ".."):
            renamed = path.with_name(f"{path.stem}-target{path.suffix}")
            rename = f" (e.g. copy it to {renamed} and pass --target {scheme}:{renamed})"
    raise AdaptationError(
        f"{run_dir} already has a task {name!r}, from {recorded}, not {spec}: a file or folder "
        f"task takes its file's or folder's name, so rename this one{rename}"
    )


def _is_path_spec(spec: str) -> bool:
    """Whether ``spec`` reads a file or folder (``npz:``, ``folder:``, ``shards:``)."""
    scheme, _, rest = spec.strip().partition(":")
    return bool(rest) and scheme.lower() in PATH_READERS


def _no_shared_label_space(model: ModularNet, tasks: list[str], target: TaskData) -> str:
    """Why no task of the run can be a source of ``target``, and what can work instead.

    Naming sources (``--sources``) cannot: a source must have the target's classes.
    """
    by_count: dict[int, list[str]] = {}
    for task in tasks:
        by_count.setdefault(model.task_classes[task], []).append(task)
    if len(by_count) == 1:
        [(count, names)] = by_count.items()
        held = f"the run's tasks ({', '.join(names)}) have {count}"
    else:
        held = "the run's tasks have " + ", ".join(
            f"{count} ({', '.join(names)})" for count, names in sorted(by_count.items())
        )
    return (
        f"the target {target.name!r} has {target.num_classes} classes but {held}: sources "
        "and target must share one label space, so no task of this run can be a source: "
        f"adapt a run that has a task with the target's {target.num_classes} classes, or "
        "choose a target with the classes of one of the run's tasks"
    )


def _check_source_names(model: ModularNet, names: list[str]) -> None:
    """Refuses sources that are not tasks of the run, or listed twice."""
    unknown = [s for s in names if s not in model.task_names]
    if unknown:
        raise AdaptationError(
            f"unknown source task(s) {unknown}: sources are tasks of the run, one of "
            f"{model.task_names}"
        )
    if len(set(names)) != len(names):
        raise AdaptationError(f"a source is listed twice in {names}")


def _load_sources(
    names: list[str], manifest: Mapping[str, Any], loader: _Loader
) -> dict[str, TaskData]:
    data = {}
    for name in names:
        spec = manifest["tasks"].get(name, {}).get("dataset")
        if spec is None:
            raise AdaptationError(
                f"the run's manifest records no dataset for the source {name!r}: adapt needs "
                "the sources' images; use a run made by `modnet train` or `modnet transfer`"
            )
        data[name] = loader(spec)
    return data


def _task_info(manifest, model, sources, spec, target: TaskData, objective, parts):
    info = io.recorded_task_info(manifest, [n for n in model.task_names if n != target.name])
    info[target.name] = {
        "dataset": portable_spec(spec),
        "transform": target.transform,
        "phase": f"adapt-{target.name}",
        "adapted_from": list(sources),
        "adapt": {"objective": objective, "parts": sorted(parts)},
    }
    return info


# ------------------------------------------------------------------------- start
def _start(
    model: ModularNet,
    name: str,
    spec: str,
    source_data: Mapping[str, TaskData],
    target: TaskData,
    objective: str,
    objective_options: Mapping[str, Any] | None,
    parts: frozenset[str],
    init: str,
    head_init: str | None,
    source_weight: float,
    config: TrainConfig,
    ctx,
    anisotropic: bool = False,
) -> dict[str, Any]:
    """Adds the target task, measures the source-only baseline, re-estimates norms if asked."""
    sources = list(source_data)
    head_init = head_init or init
    for value, what in ((init, "init"), (head_init, "head init")):
        check_init(value, sources, what, rules=(AVERAGE, NEAREST))
    device, batch = ctx.device, config.eval_batch_size
    model.to(device)
    distances = None
    if NEAREST in (init, head_init):
        distances = source_distances(model, source_data, target, seed=config.seed, device=device)
        nearest = min(distances, key=distances.__getitem__)
        rule, init = init, nearest if init == NEAREST else init
        head_init = nearest if head_init == NEAREST else head_init
    else:
        rule = init
    add_target_task(model, name, target.num_classes, sources, init, head_init, anisotropic)
    micro = config.resolved_eval_micro_batch()
    source_only = evaluate(model, {s: target for s in sources}, batch, device, micro_batch=micro)
    start_accuracy = evaluate(model, {name: target}, batch, device, micro_batch=micro)[name]
    gaps: list[float] = []
    if "norm" in parts:
        gaps = reestimate_norm_stats(
            model, name, target, config.batch_size, 1, device, config.seed, config.progress
        )
    return dict(
        target_spec=spec,
        sources=sources,
        objective=objective,
        objective_options=dict(objective_options or {}),
        parts=sorted(parts),
        init=init,
        init_rule=rule,
        head_init=head_init,
        source_distances=distances,
        source_weight=source_weight,
        anisotropic=anisotropic,
        source_only=source_only,
        start_accuracy=start_accuracy,
        start=route_matrix(model, name).tolist(),
        norm_gaps=gaps,
    )


def _count_statistics(model: ModularNet, task: str) -> int:
    return sum(
        v.numel()
        for k, v in model.norm_stats[task].state_dict().items()
        if k.endswith(("running_mean", "running_var"))
    )


def _record(run_dir: Path, phase: str, result: AdaptResult, plan: Mapping[str, Any]) -> None:
    io.record_results(
        run_dir,
        phase,
        dict(
            target=plan["target_spec"],
            sources=result.sources,
            objective=result.objective,
            objective_options=plan["objective_options"],
            parts=result.parts,
            init=plan["init"],
            init_rule=plan.get("init_rule", plan["init"]),
            source_distances=plan.get("source_distances"),
            head_init=plan["head_init"],
            source_only=result.source_only,
            best_source_only=result.best_source_only,
            start_accuracy=result.start_accuracy,
            adapted_accuracy=result.accuracy,
            source_accuracy=result.source_accuracy,
            trained_parameters=result.trained_parameters,
            auxiliary_parameters=result.auxiliary_parameters,
            adapted_statistics=result.adapted_statistics,
            first_loss=result.loss_trace[0] if result.loss_trace else None,
            last_loss=result.loss_trace[-1] if result.loss_trace else None,
            route_relation=result.relation,
            checkpoint=result.checkpoint.name if result.checkpoint else None,
            figure=result.figure.name if result.figure else None,
            anisotropic=plan.get("anisotropic", False),
            curve=result.curve,
        ),
    )
