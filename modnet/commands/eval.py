"""``modnet eval``: test accuracy of a run's tasks."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="test accuracy of a run's tasks",
        description="Evaluate tasks of a run (its latest checkpoint) on their test splits, "
        "preprocessed exactly as recorded in the run's manifest.",
    )
    parser.add_argument("run_dir", help="run or model directory")
    parser.add_argument(
        "--task", action="append", help="task to evaluate (repeatable; default all)"
    )
    parser.add_argument("--data-root", help="folder with the datasets (default: $MODNET_DATA_ROOT)")
    parser.add_argument("--test-limit", type=int, help="at most this many test images per task")
    parser.add_argument(
        "--batch-size", type=int, default=256, help="images read and normalised at a time"
    )
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="images per forward pass (default: the model family's, measured to fit the "
        "caches); 0: one pass per --batch-size batch, as in modnet bench",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="loader processes for test images on disk"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..errors import ConfigError
    from ..train import TrainConfig, evaluate, load_data
    from ._options import accuracy_table

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.micro_batch is not None and args.micro_batch < 0:
        raise ConfigError(
            f"--micro-batch must be 0 (one pass per batch) or more, got {args.micro_batch}"
        )
    model, manifest = io.load_model(args.run_dir, tasks=args.task)
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise io.CheckpointError(
                f"{args.run_dir} holds non-finite values ({name}): its training diverged, so "
                "its accuracy means nothing; train it again with a lower --lr"
            )
    config = TrainConfig(data_root=args.data_root, test_limit=args.test_limit, train_limit=1)
    specs = [manifest["tasks"][name]["dataset"] for name in model.task_names]
    data = load_data(specs, model, config)
    accuracy = evaluate(
        model,
        data,
        batch_size=args.batch_size,
        micro_batch=args.batch_size if args.micro_batch == 0 else args.micro_batch,
        workers=args.workers,
    )
    if args.json:
        print(json.dumps(accuracy, indent=2))
    else:
        print(accuracy_table(accuracy, model.task_classes))
    return 0
