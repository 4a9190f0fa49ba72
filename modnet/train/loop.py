"""The training loop: multi-task batches, per-part learning rates, resumable checkpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import io
from ..data import TaskData
from ..model import ModularNet
from .config import TrainConfig
from .distributed import DistContext, all_reduce_gradients, average_buffers, barrier
from .divergence import DivergenceGuard
from .evaluate import evaluate
from .parts import optimizer_groups
from .schedule import MultiTaskSchedule, learning_rate_factor
from .tracking import make_logger

METRICS_FILE = "metrics.jsonl"


class Trainer:
    """Trains some tasks of a model and checkpoints into a run directory.

    Which parameters train is decided beforehand with ``requires_grad`` (see
    ``configure_trainable``); the trainer optimizes exactly those.

    Args:
        model: The model, already holding every task in ``data``.
        data: Training/test data per task to train.
        config: Options.
        run_dir: Where checkpoints, metrics and results go.
        phase: Name of this training phase (``"train"``, ``"transfer-cifar10"``):
            a run directory resumes a phase that was interrupted.
        ctx: Data-parallel context (rank, world size, device).
        task_info: Per-task facts saved in the manifest (dataset spec, transform).
        resume_state: Trainer state of an interrupted run of the same phase.
        extra_manifest: Further entries for every checkpoint's manifest.
        extra_state: Further JSON-able entries for the trainer state (what a
            resumed phase needs to set itself up the same way).
    """

    def __init__(
        self,
        model: ModularNet,
        data: Mapping[str, TaskData],
        config: TrainConfig,
        run_dir: str | Path,
        phase: str,
        ctx: DistContext,
        task_info: Mapping[str, Mapping[str, Any]],
        resume_state: Mapping[str, Any] | None = None,
        extra_manifest: Mapping[str, Any] | None = None,
        extra_state: Mapping[str, Any] | None = None,
    ):
        self.model = model.to(ctx.device)
        self.data = dict(data)
        self.config = config
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.ctx = ctx
        self.task_info = {k: dict(v) for k, v in task_info.items()}
        self.extra_manifest = dict(extra_manifest or {})
        self.extra_state = dict(extra_state or {})
        self.names = list(self.data)
        self.task_ids = [model.task_names.index(n) for n in self.names]
        self.schedule = MultiTaskSchedule(
            [len(d.train_y) for d in self.data.values()],
            config.batch_size,
            config.mixing,
            config.seed,
        )
        self.total_steps = self.schedule.steps_per_epoch * config.epochs
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: every parameter is frozen")
        groups = optimizer_groups(
            model, config.lr, config.route_lr, config.head_lr or config.lr, config.weight_decay
        )
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups)
        else:
            self.optimizer = torch.optim.SGD(groups, momentum=config.momentum, nesterov=True)
        self.warmup = int(config.warmup_fraction * self.total_steps)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.step = int(resume_state["step"])
            self.history = list(json.loads(resume_state.get("history", "[]")))
            torch.set_rng_state(resume_state["rng"])
        self.forward = torch.compile(model) if config.compile else model
        self.divergence = DivergenceGuard(config, phase)
        self.logger = make_logger(config.log, self.run_dir, phase) if ctx.is_main else None

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict[str, float]:
        """Trains to the end (or from where an interrupted run stopped); returns test accuracy."""
        config, ctx = self.config, self.ctx
        self.model.train()
        steps_per_epoch = self.schedule.steps_per_epoch
        checkpoint_every = config.checkpoint_every or steps_per_epoch
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.phase,
            disable=not (config.progress and ctx.is_main),
            dynamic_ncols=True,
        )
        window_loss, window_steps, seen, started = 0.0, 0, 0, time.perf_counter()
        while self.step < self.total_steps:
            loss, samples = self._train_step(self.step)
            self.step += 1
            window_loss, window_steps, seen = window_loss + loss, window_steps + 1, seen + samples
            bar.update(1)
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                rate = seen * ctx.world_size / max(1e-9, time.perf_counter() - started)
                record = dict(
                    step=self.step,
                    epoch=self.step / steps_per_epoch,
                    loss=window_loss / window_steps,
                    lr=self.optimizer.param_groups[0]["lr"],
                    samples_per_s=rate,
                )
                bar.set_postfix(loss=f"{record['loss']:.3f}")
                self._log(record)
                window_loss, window_steps, seen, started = 0.0, 0, 0, time.perf_counter()
            if self.step % steps_per_epoch == 0 or self.step == self.total_steps:
                accuracy = self._evaluate()
                self._log(
                    dict(step=self.step, epoch=self.step / steps_per_epoch, accuracy=accuracy)
                )
                self.history.append(dict(step=self.step, accuracy=accuracy))
            if self.step % checkpoint_every == 0 or self.step == self.total_steps:
                self.checkpoint(done=self.step == self.total_steps)
        bar.close()
        return self.history[-1]["accuracy"] if self.history else self._evaluate()

    def _train_step(self, step: int) -> tuple[float, int]:
        config, ctx = self.config, self.ctx
        factor = learning_rate_factor(step, self.total_steps, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with torch.autocast(ctx.device.type, torch.bfloat16, enabled=config.precision == "bf16"):
            loss, samples = self.training_loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(self.params, ctx)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        self.optimizer.step()
        value = float(loss.detach()) * config.batch_size / max(1, samples)
        self.divergence.check_loss(value, step)
        return value, samples

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of step ``step``: images, labels and model task ids."""
        xs, ys, ids = [], [], []
        for task_index, indices in self.schedule.batch(step, self.ctx.rank, self.ctx.world_size):
            task = self.data[self.names[task_index]]
            xs.append(task.normalize(task.train_x[indices]))
            ys.append(task.train_y[indices])
            ids.append(torch.full((len(indices),), self.task_ids[task_index], dtype=torch.long))
        device = self.ctx.device
        return torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(ids).to(device)

    def training_loss(self, step: int) -> tuple[torch.Tensor, int]:
        """The loss to minimise at ``step`` and the number of samples it saw.

        Scaled by the global batch size, so that gradients summed over ranks are the
        gradients of the mean. Subclasses add terms here (see ``modnet.adapt``).
        """
        x, y, task_ids = self.batch(step)
        names = self.model.task_names
        single = bool((task_ids == task_ids[0]).all())
        logits = self.forward(x, task=names[int(task_ids[0])] if single else task_ids)
        loss = logits.new_zeros((), dtype=torch.float32)
        for model_id in task_ids.unique().tolist():
            rows = task_ids == model_id
            classes = self.model.task_classes[names[model_id]]
            loss = loss + F.cross_entropy(
                logits[rows, :classes].float(),
                y[rows],
                label_smoothing=self.config.label_smoothing,
                reduction="sum",
            )
        return loss / self.config.batch_size, len(y)

    # ------------------------------------------------------------------- outputs
    def _evaluate(self) -> dict[str, float]:
        average_buffers(self.model, self.ctx)
        return evaluate(
            self.model,
            self.data,
            self.config.eval_batch_size,
            self.ctx.device,
            self.config.precision,
        )

    def _log(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        self.logger.log(dict(phase=self.phase, **record), self.model)

    def trainer_state(self, done: bool) -> dict[str, Any]:
        return dict(
            phase=self.phase,
            step=self.step,
            total_steps=self.total_steps,
            done=done,
            optimizer=self.optimizer.state_dict(),
            rng=torch.get_rng_state(),
            history=json.dumps(self.history),
            config=json.dumps(self.config.to_dict()),
            **{key: json.dumps(value) for key, value in self.extra_state.items()},
        )

    def checkpoint(self, done: bool) -> None:
        """Saves a complete checkpoint on rank 0; every rank waits for it."""
        average_buffers(self.model, self.ctx)
        self.divergence.check_model(self.model, self.step)
        if self.ctx.is_main:
            io.save_checkpoint(
                self.run_dir,
                f"{self.phase}-step{self.step:07d}",
                self.model,
                trainer_state=self.trainer_state(done),
                task_info=self.task_info,
                extra=self.extra_manifest,
            )
        barrier(self.ctx)
