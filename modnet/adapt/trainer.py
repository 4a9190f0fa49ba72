"""The adaptation trainer: the training loop of ``modnet.train`` with another loss.

Each step takes one batch of every source (labelled) and one of the target
(unlabelled, ``batch_size`` images each) and minimises the objective on their
pooled features; the target is compared with the sources its head comes from
(``matched``), as every source's features are shaped for its own head.

Sources keep their supervised loss whenever a part they share with the target
trains (``templates``, ``trunk``, ``stem``, ``hypernet``): it anchors the
shared weights so the sources stay solved. When only target-owned parts train
(route, head, norm), the sources' outputs cannot change, so that loss would have
no gradient and is skipped, and the sources' features, which are then
constant, are computed once and cached, as is their test accuracy.

Source tasks always run on their frozen running statistics; the target's
statistics update (in train mode) only when ``norm`` trains. An epoch is one
pass over the target's training images.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import TaskData
from ..model import ModularNet
from ..train.config import TrainConfig
from ..train.distributed import DistContext
from ..train.evaluate import default_micro_batch, evaluate
from ..train.loop import Trainer
from ..train.schedule import MultiTaskSchedule
from .objectives import AdaptationObjective

UNKNOWN_LABEL = -1  # what the target's rows carry instead of labels


class AdaptationTrainer(Trainer):
    """Adapts a target task without its labels (see the module docstring).

    Args:
        model: The model, holding the sources and the target task, with
            ``requires_grad`` already set (``ModularNet.set_trainable``).
        sources: Source tasks' data (labelled).
        target: The target's data; its training labels are never read.
        objective: What to minimise; its own parameters (a discriminator) are
            optimised with the model's trainable ones.
        config: Options (``batch_size`` is per domain).
        run_dir: Where checkpoints, metrics and results go.
        phase: Phase name, e.g. ``"adapt-mnist_m"``.
        ctx: Data-parallel context.
        task_info: Per-task facts for the manifest.
        adapt_norm: The target's statistics update during training.
        source_weight: Weight of the sources' supervised loss (when it applies).
        matched: The sources whose features the objective compares the target
            with (default: all). Each source's features are read by its own
            head, so the target is matched to the sources its head comes from.
        resume_state: Trainer state of an interrupted run of the same phase.
        extra_manifest: Further manifest entries.
        extra_state: Further trainer-state entries (the adaptation plan).
        curve_every: Evaluate the target every this many steps (and before the
            first step) on its first ``curve_sample`` test images, into ``curve``;
            0: never.
        curve_sample: Test images of the target that ``curve_every`` evaluates.
    """

    def __init__(
        self,
        model: ModularNet,
        sources: Mapping[str, TaskData],
        target: TaskData,
        objective: AdaptationObjective,
        config: TrainConfig,
        run_dir: str | Path,
        phase: str,
        ctx: DistContext,
        task_info: Mapping[str, Mapping[str, Any]],
        adapt_norm: bool = False,
        source_weight: float = 1.0,
        matched: list[str] | None = None,
        resume_state: Mapping[str, Any] | None = None,
        extra_manifest: Mapping[str, Any] | None = None,
        extra_state: Mapping[str, Any] | None = None,
        curve_every: int = 0,
        curve_sample: int = 500,
    ):
        self.objective = objective.to(ctx.device)
        self.target = target.name
        self.source_names = list(sources)
        self.matched = list(matched or sources)
        self.adapt_norm = adapt_norm
        self.source_weight = source_weight
        self.loss_trace: list[float] = []
        self.curve: list[dict[str, float]] = []
        self.curve_every = curve_every
        self._curve_data = (
            dataclasses.replace(
                target, test_x=target.test_x[:curve_sample], test_y=target.test_y[:curve_sample]
            )
            if curve_every
            else None
        )
        shared = [*model.pool.parameters(), *model.trunk.parameters()]
        if model.hypernet is not None:
            shared += list(model.hypernet.parameters())
        self.shared_trains = any(p.requires_grad for p in shared)
        self._source_cache: dict[str, torch.Tensor] = {}
        self._source_accuracy: dict[str, float] | None = None
        super().__init__(
            model,
            {**sources, target.name: target},
            config,
            run_dir,
            phase,
            ctx,
            task_info,
            resume_state=resume_state,
            extra_manifest=extra_manifest,
            extra_state=extra_state,
        )
        self._pooled = torch.compile(self._pooled_eager) if config.compile else self._pooled_eager

    # -------------------------------------------------------------------- hooks
    def make_schedule(self) -> MultiTaskSchedule:
        # One stream of batches per domain; an epoch is a pass over the target.
        config = self.config
        self.streams = {
            name: MultiTaskSchedule(
                [len(task.train_y)], config.batch_size, "mixed", config.seed + i
            )
            for i, (name, task) in enumerate(self.data.items())
        }
        return self.streams[self.target]

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.model, self.objective]

    def param_groups(self) -> list[dict[str, Any]]:
        groups = super().param_groups()
        extra = [p for p in self.objective.parameters() if p.requires_grad]
        if extra:
            groups.append(dict(params=extra, name="objective", lr=self.config.lr, weight_decay=0.0))
        return groups

    def statistics_tasks(self) -> list[str]:
        return [self.target] if self.adapt_norm else []

    def extra_trainer_state(self) -> dict[str, Any]:
        # The loss trace and accuracy curve so far: a resumed phase reports them whole.
        return dict(
            objective=self.objective.state_dict(),
            loss_trace=json.dumps(self.loss_trace),
            curve=json.dumps(self.curve),
        )

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        super().load_trainer_state(state)
        if "objective" in state:
            self.objective.load_state_dict(state["objective"])
        self.loss_trace = list(json.loads(state.get("loss_trace", "[]")))
        self.curve = list(json.loads(state.get("curve", "[]")))

    def fit(self) -> dict[str, float]:
        if self.curve_every and self.step == 0:
            self._curve_point()
        return super().fit()

    def _train_step(self, step: int) -> tuple[float, int]:
        value = super()._train_step(step)
        if self.curve_every and (step + 1) % self.curve_every == 0:
            self._curve_point(step + 1)
        return value

    def _evaluate(self) -> dict[str, float]:
        # Sources cannot change when only target-owned parts train: measured once.
        if self.shared_trains:
            return super()._evaluate()
        names = (
            [*self.source_names, self.target] if self._source_accuracy is None else [self.target]
        )
        measured = evaluate(
            self.model,
            {n: self.data[n] for n in names},
            self.config.eval_batch_size,
            self.ctx.device,
            self.config.resolved_precision(self.model),
            micro_batch=self.config.resolved_eval_micro_batch(),
            workers=self.config.data_workers,
            progress=self.config.progress and self.ctx.is_main,
        )
        if self._source_accuracy is None:
            self._source_accuracy = {n: measured[n] for n in self.source_names}
        return {**self._source_accuracy, self.target: measured[self.target]}

    def _curve_point(self, step: int = 0) -> None:
        accuracy = evaluate(
            self.model,
            {self.target: self._curve_data},
            self.config.eval_batch_size,
            self.ctx.device,
            micro_batch=self.config.resolved_eval_micro_batch(),
        )[self.target]
        self.curve.append(dict(step=step, accuracy=accuracy))

    # ------------------------------------------------------------------ batches
    def domain_indices(self, name: str, step: int, micro: int = 0) -> torch.Tensor:
        """This rank's sample indices of domain ``name`` at ``step`` (micro-batch ``micro``)."""
        ((_, indices),) = self.streams[name].batch(step, *self.shard(micro))
        return indices

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every domain's batch of ``step``; target rows carry label ``-1`` (unknown)."""
        xs, ys, ids = [], [], []
        for name in self.names:
            task, indices = self.data[name], self.domain_indices(name, step, micro)
            xs.append(task.normalize(task.train_x[indices]))
            labels = task.train_y[indices]
            ys.append(torch.full_like(labels, UNKNOWN_LABEL) if name == self.target else labels)
            ids.append(torch.full((len(indices),), self.model.task_names.index(name)))
        device = self.ctx.device
        return torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(ids).to(device)

    # --------------------------------------------------------------------- loss
    def pooled_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """The last block's output after the final norm, pooled: what objectives compare.

        Compiled with ``torch.compile`` when the config asks for it, as training is.
        """
        return self._pooled(x, task)

    def _pooled_eager(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x, task), task, pre_logits=True)

    def training_loss(self, step: int, micro: int = 0) -> tuple[torch.Tensor | None, int]:
        model = self.model
        self.objective.progress = step / max(1, self.total_steps)
        if not len(self.domain_indices(self.target, step, micro)):
            return None, 0
        if not self.shared_trains:
            return self._target_only_loss(step, micro)
        x, y, ids = self.batch(step, micro)
        model.freeze_norm_stats(True)  # sources never change their statistics
        features, supervised, count = {}, x.new_zeros(()), 0
        for name in self.source_names:
            rows = ids == model.task_names.index(name)
            features[name] = self.pooled_features(x[rows], name)
            logits = model.heads[name](features[name]).float()
            supervised = supervised + F.cross_entropy(logits, y[rows], reduction="sum")
            count += int(rows.sum())
        model.freeze_norm_stats(not self.adapt_norm)
        rows = ids == model.task_names.index(self.target)
        matched = {k: v for k, v in features.items() if k in self.matched}
        objective = self._objective(matched, x[rows])
        loss = objective + self.source_weight * supervised / max(1, count)
        return loss / self.shares, int(rows.sum())

    def _target_only_loss(self, step: int, micro: int) -> tuple[torch.Tensor, int]:
        features = {}
        if self.objective.needs_source_features:
            for name in self.matched:
                cached = self._cached_source_features(name)
                indices = self.domain_indices(name, step, micro)
                features[name] = cached[indices.to(cached.device)]
        task, indices = self.data[self.target], self.domain_indices(self.target, step, micro)
        self.model.freeze_norm_stats(not self.adapt_norm)
        x = task.normalize(task.train_x[indices]).to(self.ctx.device)
        return self._objective(features, x) / self.shares, len(indices)

    def _objective(self, source_features: dict[str, torch.Tensor], x: torch.Tensor):
        features = self.pooled_features(x, self.target)
        logits = self.model.heads[self.target](features)
        loss = self.objective.loss(
            {k: v.float() for k, v in source_features.items()}, features.float(), logits.float()
        )
        self.loss_trace.append(float(loss.detach()))
        return loss

    @torch.no_grad()
    def _cached_source_features(self, name: str) -> torch.Tensor:
        # Constant when no shared part trains: one pass instead of one per step.
        if name not in self._source_cache:
            task, model = self.data[name], self.model
            was_training = model.training
            model.eval()
            chunks = [
                self.pooled_features(task.normalize(x).to(self.ctx.device), name).float()
                for x in task.train_x.split(
                    self.config.resolved_eval_micro_batch() or default_micro_batch(model)
                )
            ]
            model.train(was_training)
            self._source_cache[name] = torch.cat(chunks)
        return self._source_cache[name]
