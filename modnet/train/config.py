"""Training options, as one JSON-able dataclass shared by the CLI and Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "sgd")


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
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = at the end of every epoch
    log_every: int = 25
    log: str = "jsonl"  # metrics.jsonl; "tensorboard" adds TensorBoard event files
    eval_batch_size: int = 256
    progress: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {OPTIMIZERS}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
