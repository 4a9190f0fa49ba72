"""Training options, as one JSON-able dataclass shared by the CLI and Python."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError
from .schedule import MIXING_MODES

PRECISIONS = ("auto", "fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")

# Options that cannot change what a run computes: a resumed run may change them.
# (The device may differ, e.g. a GPU run finished on a CPU, at the usual numerical
# tolerance; checkpoint_every only moves where an exactly resumable run saves.)
RESULT_NEUTRAL = frozenset(
    {
        "progress",
        "log_every",
        "log",
        "checkpoint_every",
        "eval_batch_size",
        "eval_every",
        "device",
        "data_root",
        "download",
        "eval_micro_batch",
        "data_workers",
        "in_memory_mb",
    }
)


@dataclass
class TrainConfig:
    """How to train. Defaults are the built-in synthetic run: minutes on 2 CPU cores."""

    model: str = "modnet_conv_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=list)  # empty: the synthetic suite's defaults
    data_root: str | None = None
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    epochs: int = 2
    batch_size: int = 64
    # Samples per forward/backward; 0 = the whole batch. Gradients accumulate over the
    # micro-batches of a step; BatchNorm normalises each micro-batch by its own
    # statistics and running statistics move once per step by their mean (as ranks do).
    micro_batch_size: int = 0
    mixing: str = "mixed"
    optimizer: str = "adamw"
    lr: float = 3e-3
    route_lr: float = 3e-2
    head_lr: float | None = None
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "auto"  # "auto": the model's default_precision (the faster on CPU)
    compile: bool = False
    device: str = "auto"
    seed: int = 0  # -2**40 to 2**40
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch
    log_every: int = 25
    log: str = "jsonl"  # metrics.jsonl; "tensorboard" adds TensorBoard event files
    eval_every: int = 1  # epochs between test evaluations (the last step always); 0: last only
    eval_batch_size: int = 256
    # images per forward pass when scoring; None: the family's default; 0: one pass per
    # eval batch (as ``modnet eval --micro-batch 0``)
    eval_micro_batch: int | None = None
    augment: bool = False  # the dataset's training augmentation (modnet.data.augment)
    data_workers: int | None = None  # DataLoader workers for data on disk; None: automatic
    in_memory_mb: float | None = 1024.0  # image folders and shards above this stay on disk
    progress: bool = True

    def __post_init__(self) -> None:
        """Checks every option before any work.

        Raises:
            ConfigError: An option is of the wrong type or out of range; the message
                names the option (as its command-line flag) and what it accepts.
        """
        _choice("precision", self.precision, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("mixing", self.mixing, MIXING_MODES)
        for name in ("epochs", "batch_size", "log_every", "eval_batch_size"):
            _integer(name, getattr(self, name), minimum=1)
        _integer("checkpoint_every", self.checkpoint_every, minimum=0)
        _integer("eval_every", self.eval_every, minimum=0)
        if self.eval_micro_batch is not None:
            _integer("eval_micro_batch", self.eval_micro_batch, minimum=0)
        if self.data_workers is not None:
            _integer("data_workers", self.data_workers, minimum=0)
        if self.in_memory_mb is not None:
            _number("in_memory_mb", self.in_memory_mb, low=0.0)
        if self.micro_batch_size is None:
            self.micro_batch_size = 0
        _integer("micro_batch_size", self.micro_batch_size, minimum=0)
        _integer("seed", self.seed, minimum=None)
        if abs(self.seed) > MAX_SEED:  # each stream seeds with seed * 1_000_003 + ...
            raise ConfigError(
                f"{_flag('seed')} must be between -{MAX_SEED:,} and {MAX_SEED:,} (2**40), "
                f"got {self.seed}: torch's generators take 64-bit seeds"
            )
        for name in ("train_limit", "test_limit"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum=1)
        for name in ("lr", "route_lr", "head_lr"):
            if name != "head_lr" or self.head_lr is not None:
                _number(name, getattr(self, name), low=0.0, low_open=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        _number("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        _number("warmup_fraction", self.warmup_fraction, low=0.0, high=1.0, high_open=True)
        _number("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        if self.grad_clip is not None and self.grad_clip != 0:
            _number("grad_clip", self.grad_clip, low=0.0, low_open=True, hint="; 0 disables it")
        if self.grad_clip == 0:
            self.grad_clip = None
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"--model must be a model name, got {self.model!r}")
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(
                f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}"
            )
        if not isinstance(self.tasks, (list, tuple)) or not all(
            isinstance(t, str) and t.strip() for t in self.tasks
        ):
            raise ConfigError(
                f"--tasks must be dataset specs separated by commas, got {self.tasks!r}: "
                "e.g. --tasks synth_color,synth_size (leave it out for the synthetic suite)"
            )
        self.tasks = [t.strip() for t in self.tasks]

    def result_options(self) -> dict[str, Any]:
        """The options that determine what the run computes (all but ``RESULT_NEUTRAL``)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESULT_NEUTRAL}

    def resolved_eval_micro_batch(self) -> int | None:
        """``eval_micro_batch`` for ``evaluate``: 0 resolved to ``eval_batch_size``."""
        return self.eval_batch_size if self.eval_micro_batch == 0 else self.eval_micro_batch

    def resolved_precision(self, model: Any) -> str:
        """``precision``, with ``"auto"`` resolved to ``model.default_precision``."""
        if self.precision != "auto":
            return self.precision
        return getattr(model, "default_precision", "fp32")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config ``to_dict`` gave (what a run stores in its trainer state).

        Every key ``to_dict`` has ever written is still a field (none was removed or
        renamed), so a key that is none is a mistake, not an old option to skip.

        Raises:
            ConfigError: A key that is no field (the closest field is suggested), or
                a value ``TrainConfig`` refuses.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"TrainConfig.from_dict needs a mapping of options, got {type(data).__name__}"
            )
        known = [f.name for f in fields(cls)]
        unknown = [key for key in data if key not in known]
        if unknown:
            named = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                named.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"unknown TrainConfig option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(named)}: check the spelling; the options are {', '.join(known)}"
            )
        return cls(**data)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


MAX_SEED = 2**40  # times the schedule's stream factor, still within a 64-bit seed


def _integer(name: str, value: Any, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_flag(name)} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{_flag(name)} must be at least {minimum}, got {value}")


def _number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{_flag(name)} must be a finite number, got {value!r}{hint}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ConfigError(f"{_flag(name)} must be {bound}, got {value:g}{hint}")
    if high is not None and (value > high or (high_open and value == high)):
        bound = f"< {high:g}" if high_open else f"<= {high:g}"
        raise ConfigError(f"{_flag(name)} must be {bound}, got {value:g}{hint}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
