"""Training: multi-task pools, new tasks by routes, resumable and data-parallel."""

from .api import RunDirError, TrainResult, load_data, train, transfer
from .config import TrainConfig
from .evaluate import evaluate
from .loop import Trainer
from .parts import configure_trainable, optimizer_groups, parse_parts
from .schedule import MultiTaskSchedule, cosine_schedule
from .step import StepRunner

__all__ = [
    "MultiTaskSchedule",
    "RunDirError",
    "StepRunner",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "configure_trainable",
    "cosine_schedule",
    "evaluate",
    "load_data",
    "optimizer_groups",
    "parse_parts",
    "train",
    "transfer",
]
