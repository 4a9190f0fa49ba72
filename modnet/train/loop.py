"""The training loop: multi-task batches, per-part learning rates, resumable checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import io
from ..data import TaskData, TrainBatches
from ..errors import ConfigError
from ..model import ModularNet
from .config import TrainConfig
from .distributed import DistContext, barrier
from .divergence import DivergenceGuard
from .evaluate import evaluate
from .parts import optimizer_groups
from .schedule import MultiTaskSchedule
from .step import StepRunner
from .tracking import make_logger

METRICS_FILE = "metrics.jsonl"


class Trainer:
    """Trains some tasks of a model and checkpoints into a run directory.

    Which parameters train is decided beforehand with ``requires_grad`` (see
    ``ModularNet.set_trainable``); the trainer optimizes exactly those. Every
    loop of modnet is this one: subclasses change it through hooks
    (``training_loss`` for the loss and its extra terms, ``batch`` for the data,
    ``trained_modules``/``param_groups`` for what trains, ``statistics_tasks``
    for whose BatchNorm statistics train, ``extra_trainer_state`` to resume),
    and each step runs through ``StepRunner`` (DDP, micro-batches, schedule).

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
        if ctx.is_main:  # before its first record: never into a folder modnet did not write
            io.check_run_target(run_dir)
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
        self.schedule = self.make_schedule()
        self.total_steps = self.schedule.steps_per_epoch * config.epochs
        per_rank = math.ceil(config.batch_size / ctx.world_size)
        self.micro_batches = math.ceil(per_rank / (config.micro_batch_size or per_rank))
        self.shares = ctx.world_size * self.micro_batches
        smallest = self.schedule.smallest_batch
        if smallest < ctx.world_size:
            raise ConfigError(
                f"a batch of {smallest} samples cannot be shared by {ctx.world_size} ranks: "
                "raise --batch-size or use fewer processes"
            )
        self.forward = torch.compile(model) if config.compile else model
        self.runner = StepRunner(
            self.trained_modules(),
            self._share_loss,
            self.param_groups(),
            self.total_steps,
            int(config.warmup_fraction * self.total_steps),
            config.optimizer,
            config.momentum,
            config.grad_clip,
            ctx,
            self.micro_batches,
            self.trained_statistics,
        )
        self.optimizer = self.runner.optimizer
        self.params = self.runner.params
        self.step = 0
        self.history: list[dict[str, Any]] = []
        # Loss summed over the steps since the last logged record, and their count.
        self.window_loss, self.window_steps = 0.0, 0
        if resume_state is not None:
            self.load_trainer_state(resume_state)
            if ctx.is_main:  # said even without a progress bar
                io.run.note(
                    f"resuming the interrupted {phase} from its checkpoint at step {self.step} "
                    f"of {self.total_steps}"
                )
        self.divergence = DivergenceGuard(config, phase)
        # Records up to the resumed step are kept: its log and evaluation precede its checkpoint.
        first_step = 0 if resume_state is None else self.step + 1
        self.logger = (
            make_logger(config.log, self.run_dir, phase, first_step) if ctx.is_main else None
        )
        if self.logger is not None:
            if resume_state is None:
                self.logger.start()
            else:  # the run holds this attempt's weights (a kill may have beaten the mark)
                self.logger.checkpointed(self.step)

    # ------------------------------------------------------------------ hooks
    def make_schedule(self) -> MultiTaskSchedule:
        """Which samples form each step's batch (an epoch is one pass of it)."""
        config = self.config
        sizes = [len(d.train_y) for d in self.data.values()]
        return MultiTaskSchedule(sizes, config.batch_size, config.mixing, config.seed)

    def trained_modules(self) -> list[torch.nn.Module]:
        """Modules whose trainable parameters the loss reaches (wrapped by DDP)."""
        return [self.model]

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups of the trainable parameters, with learning rate and decay."""
        config = self.config
        return optimizer_groups(
            self.model,
            config.lr,
            config.route_lr,
            config.head_lr or config.lr,
            config.weight_decay,
        )

    def statistics_tasks(self) -> list[str]:
        """Tasks whose BatchNorm running statistics train in this phase."""
        return [] if getattr(self.model, "norm_stats_frozen", False) else list(self.names)

    def trained_statistics(self) -> list[torch.Tensor]:
        """The running-statistics buffers of ``statistics_tasks``."""
        return [b for t in self.statistics_tasks() for b in self.model.norm_stats[t].buffers()]

    def shard(self, micro: int) -> tuple[int, int]:
        """``(index, count)`` of this rank's micro-batch ``micro`` among all shares of a step.

        Shares ``micro * world_size + rank``: the micro-batches of one rank together
        are exactly that rank's share, and one process with ``M`` micro-batches
        sees the samples ``M`` ranks would.
        """
        return micro * self.ctx.world_size + self.ctx.rank, self.shares

    # ------------------------------------------------------------------ main loop
    def fit(self) -> dict[str, float]:
        """Trains to the end (or from where an interrupted run stopped); returns test accuracy."""
        config, ctx = self.config, self.ctx
        self.model.train()
        steps_per_epoch = self.schedule.steps_per_epoch
        checkpoint_every = config.checkpoint_every or steps_per_epoch
        # Closed however the loop ends, so a Ctrl-C message starts on a line of its own.
        with tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.phase,
            disable=not (config.progress and ctx.is_main),
            dynamic_ncols=True,
        ) as bar:
            seen, started = 0, time.perf_counter()
            while self.step < self.total_steps:
                loss, samples = self._train_step(self.step)
                self.step += 1
                self.window_loss, self.window_steps = self.window_loss + loss, self.window_steps + 1
                seen += samples
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    rate = seen * ctx.world_size / max(1e-9, time.perf_counter() - started)
                    record = dict(
                        step=self.step,
                        epoch=self.step / steps_per_epoch,
                        loss=self.window_loss / self.window_steps,
                        lr=self.optimizer.param_groups[0]["lr"],
                        samples_per_s=rate,
                    )
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                    self._log(record)
                    self.window_loss, self.window_steps = 0.0, 0
                    seen, started = 0, time.perf_counter()
                if self._evaluates_at(self.step):
                    accuracy = self._evaluate()
                    self._log(
                        dict(step=self.step, epoch=self.step / steps_per_epoch, accuracy=accuracy)
                    )
                    self.history.append(dict(step=self.step, accuracy=accuracy))
                if self.step % checkpoint_every == 0 or self.step == self.total_steps:
                    self.checkpoint(done=self.step == self.total_steps)
        return self.history[-1]["accuracy"] if self.history else self._evaluate()

    def _evaluates_at(self, step: int) -> bool:
        """Whether the test splits are scored after ``step``: every ``eval_every``
        epochs, and after the last step."""
        epoch, rest = divmod(step, self.schedule.steps_per_epoch)
        every = self.config.eval_every
        return step == self.total_steps or (rest == 0 and every > 0 and epoch % every == 0)

    def _train_step(self, step: int) -> tuple[float, int]:
        config = self.config
        loss, samples = self.runner.run(step)
        value = loss * config.batch_size / max(1, samples)
        self.divergence.check_loss(value, step)
        return value, samples

    def _share_loss(self, step: int, micro: int) -> tuple[torch.Tensor | None, int]:
        precision = self.config.resolved_precision(self.model)
        with torch.autocast(self.ctx.device.type, torch.bfloat16, enabled=precision == "bf16"):
            return self.training_loss(step, micro)

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's micro-batch ``micro`` of step ``step``: images, labels, model task ids."""
        if getattr(self, "_batches", None) is None:  # from memory, or a DataLoader for files
            self._batches = TrainBatches(
                self.data,
                self.schedule,
                self.ctx.rank,
                self.ctx.world_size,
                seed=self.config.seed,
                workers=self.config.data_workers,
                device=self.ctx.device,
            )
        x, y, tasks = self._batches(step, *self.shard(micro))
        return x, y, torch.tensor(self.task_ids, device=tasks.device)[tasks]

    def training_loss(self, step: int, micro: int = 0) -> tuple[torch.Tensor | None, int]:
        """The loss of micro-batch ``micro`` at ``step`` and the number of samples it saw.

        Scaled by the global batch size, so that gradients summed over micro-batches
        and ranks are the gradients of the mean; ``None`` for an empty micro-batch.
        Subclasses add terms here (see ``modnet.adapt``).
        """
        x, y, task_ids = self.batch(step, micro)
        if not len(y):
            return None, 0
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
        return evaluate(
            self.model,
            self.data,
            self.config.eval_batch_size,
            self.ctx.device,
            self.config.resolved_precision(self.model),
            micro_batch=self.config.resolved_eval_micro_batch(),
            workers=self.config.data_workers,
            progress=self.config.progress and self.ctx.is_main,
            shard=(self.ctx.rank, self.ctx.world_size),
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
            lr_schedule=self.runner.lr_schedule.state_dict(),
            rng=torch.get_rng_state(),
            history=json.dumps(self.history),
            loss_window=json.dumps([self.window_loss, self.window_steps]),
            config=json.dumps(self.config.to_dict()),
            **{key: json.dumps(value) for key, value in self.extra_state.items()},
            **self.extra_trainer_state(),
        )

    def extra_trainer_state(self) -> dict[str, Any]:
        """Further state a subclass needs to resume exactly (e.g. an objective's weights)."""
        return {}

    def load_trainer_state(self, state: Mapping[str, Any]) -> None:
        """Continues from ``trainer_state`` of an interrupted run of the same phase."""
        self.runner.load_state_dict(
            dict(optimizer=state["optimizer"], lr=state.get("lr_schedule", {}))
        )
        self.step = int(state["step"])
        self.history = list(json.loads(state.get("history", "[]")))
        # The loss of the steps since the last logged record, so that the next record
        # averages the same steps as an uninterrupted run's (older checkpoints lack it:
        # that record then averages the steps since the resume).
        loss, steps = json.loads(state.get("loss_window", "[0.0, 0]"))
        self.window_loss, self.window_steps = float(loss), int(steps)
        torch.set_rng_state(state["rng"])

    def checkpoint(self, done: bool) -> None:
        """Saves a complete checkpoint on rank 0; every rank waits for it."""
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
            self.logger.checkpointed(self.step)  # its curves replace an earlier attempt's
        barrier(self.ctx)
