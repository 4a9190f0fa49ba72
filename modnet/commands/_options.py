"""Options shared by the commands that train (``train``, ``transfer``, ``adapt``)."""

from __future__ import annotations

import argparse
import ast
from typing import Any

from ..errors import ConfigError
from ..train.config import OPTIMIZERS, PRECISIONS, TrainConfig
from ..train.schedule import MIXING_MODES

DEFAULTS = TrainConfig()


def add_training_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--data-root", help="folder with the datasets (default: $MODNET_DATA_ROOT)")
    group.add_argument("--download", action="store_true", help="let torchvision download data")
    group.add_argument("--epochs", type=int, default=DEFAULTS.epochs)
    group.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    group.add_argument(
        "--mixing",
        choices=MIXING_MODES,
        default=DEFAULTS.mixing,
        help="tasks mixed within each batch, or one task per batch in turn",
    )
    group.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer)
    group.add_argument("--lr", type=float, default=DEFAULTS.lr, help="templates and trunk")
    group.add_argument("--route-lr", type=float, default=DEFAULTS.route_lr)
    group.add_argument("--head-lr", type=float, default=None, help="default: --lr")
    group.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    group.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing)
    group.add_argument(
        "--grad-clip", type=float, default=DEFAULTS.grad_clip, help="max gradient norm; 0 disables"
    )
    group.add_argument("--precision", choices=PRECISIONS, default=DEFAULTS.precision)
    group.add_argument("--compile", action="store_true", help="torch.compile the model")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default=DEFAULTS.device)
    group.add_argument("--seed", type=int, default=DEFAULTS.seed)
    group.add_argument("--train-limit", type=int, help="at most this many training images per task")
    group.add_argument("--test-limit", type=int, help="at most this many test images per task")
    group.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints (default: every epoch)",
    )
    group.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values = dict(
        data_root=args.data_root,
        download=args.download,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        mixing=args.mixing,
        optimizer=args.optimizer,
        lr=args.lr,
        route_lr=args.route_lr,
        head_lr=args.head_lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        grad_clip=args.grad_clip,
        precision=args.precision,
        compile=args.compile,
        device=args.device,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        progress=not args.no_progress,
    )
    values.update(overrides)
    return TrainConfig(**values)


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["depth=8", "route=hard"]`` -> ``{"depth": 8, "route": "hard"}``."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed


def accuracy_table(accuracy: dict[str, float], classes: dict[str, int]) -> str:
    """The per-task accuracy table printed at the end of a run."""
    width = max([4, *map(len, accuracy)])
    lines = [f"{'task':<{width}}  classes  chance  accuracy", "-" * (width + 27)]
    for task, value in accuracy.items():
        count = classes[task]
        lines.append(f"{task:<{width}}  {count:7d}  {1 / count:6.3f}  {value:8.4f}")
    return "\n".join(lines)
