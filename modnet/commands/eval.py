"""``modnet eval``: test accuracy of a run's tasks."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import replace


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
    parser.add_argument(
        "--data-root",
        help="folder with the datasets (default: $MODNET_DATA_ROOT, else the --data-root "
        "each task was trained with, as its phase's config file records it)",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="let torchvision download a missing dataset into --data-root",
    )
    parser.add_argument(
        "--data",
        action="append",
        metavar="TASK=SPEC",
        help="evaluate TASK on the test split of SPEC instead of the dataset the run recorded "
        "(data that moved: --data digits=npz:new/place/digits.npz; repeatable)",
    )
    parser.add_argument("--test-limit", type=int, help="at most this many test images per task")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="a progress bar per task while scoring (default: when stderr is a terminal)",
    )
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
        "--workers",
        "--data-workers",  # the training commands' spelling
        dest="workers",
        type=int,
        default=None,
        help="loader processes for test images on disk",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import io
    from ..data import DataError
    from ..errors import ConfigError
    from ..train import TrainConfig, evaluate, load_data
    from ._options import accuracy_table

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.micro_batch is not None and args.micro_batch < 0:
        raise ConfigError(
            f"--micro-batch must be 0 (one pass per batch) or more, got {args.micro_batch}"
        )
    moved = _moved_data(args.data or [])
    model, manifest = io.load_model(args.run_dir, tasks=args.task)
    unknown = sorted(set(moved) - set(model.task_names))
    if unknown and unknown[0] in manifest["tasks"]:
        raise ConfigError(
            f"--data {unknown[0]}=...: task {unknown[0]!r} is not evaluated (--task "
            f"{' --task '.join(model.task_names)}): add --task {unknown[0]}"
        )
    if unknown:
        raise ConfigError(
            f"--data {unknown[0]}=...: {args.run_dir} has no task {unknown[0]!r} to evaluate "
            f"(its tasks: {', '.join(manifest['tasks'])})"
        )
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not bool(value.isfinite().all()):
            raise io.CheckpointError(
                f"{args.run_dir} holds non-finite values ({name}): its training diverged, so "
                "its accuracy means nothing; train it again with a lower --lr"
            )
    specs = {
        name: moved.get(name, manifest["tasks"][name].get("dataset")) for name in model.task_names
    }
    unrecorded = [name for name, spec in specs.items() if spec is None]
    if unrecorded:
        raise ConfigError(
            f"{args.run_dir} records no dataset for task {unrecorded[0]!r} (a model saved "
            f"without task_info): pass --data {unrecorded[0]}=SPEC, or save it with "
            "io.save_model(..., task_info=io.recorded_task_info(manifest, tasks)) with the "
            "manifest io.load_model returned for the model the task came from"
        )
    unknown_preprocessing = [n for n in specs if not manifest["tasks"][n].get("transform")]
    if unknown_preprocessing:
        io.run.note(
            f"{', '.join(unknown_preprocessing)}: no preprocessing recorded (a model saved "
            "without task_info): scored with the given data's own statistics and seed 0, "
            "which may differ from how the task was trained"
        )
    partly = io.partly_trained(args.run_dir, manifest, model.task_names)
    if partly:
        io.run.note(partly)
    config = TrainConfig(
        data_root=args.data_root, download=args.download, test_limit=args.test_limit, train_limit=1
    )
    data = {}
    for name, spec in specs.items():
        # the seed the run drew its subsets (and synthetic images) with: the same test set
        task_config = replace(
            config,
            seed=_recorded_seed(manifest["tasks"][name]),
            data_root=_data_root(args, manifest, name),
        )
        try:
            with warnings.catch_warnings():  # one training image is all eval asks for
                warnings.filterwarnings("ignore", ".*: train_limit=", UserWarning)
                (data[name],) = load_data([spec], model, task_config).values()
        except DataError as error:
            if name in moved:
                raise
            raise DataError(f"{error}; if the data moved, pass --data {name}=SPEC") from None
        if name in moved and data[name].num_classes != model.task_classes[name]:
            raise ConfigError(
                f"--data {name}={moved[name]} has {data[name].num_classes} classes, task "
                f"{name!r} {model.task_classes[name]}: give a copy of the task's own dataset"
            )
        if name in moved:
            _note_other_class_names(name, moved[name], manifest["tasks"][name], data[name])
    # said once the data is found, before the scoring
    sizes = {name: len(task.test_y) for name, task in data.items()}
    _note_recorded_limit(args.run_dir, manifest, sizes, args.test_limit)
    accuracy = evaluate(
        model,
        data,
        batch_size=args.batch_size,
        micro_batch=args.batch_size if args.micro_batch == 0 else args.micro_batch,
        workers=args.workers,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    if args.json:
        print(json.dumps(accuracy, indent=2))
    else:
        print(accuracy_table(accuracy, model.task_classes))
    return 0


def _note_other_class_names(name: str, spec: str, entry: dict, task) -> None:
    """Says when ``--data NAME=SPEC`` names its classes otherwise than the data the task
    was trained on (both with names, e.g. two image folders): labels are matched by
    index, so class folders that sort differently score as wrong answers. A note, not
    an error: a new domain of the same classes (``--data mnist=mnist_m``) may name them
    otherwise."""
    from .. import io

    trained = (entry.get("transform") or {}).get("classes")
    given = task.transform.get("classes")
    if not trained or not given or list(trained) == list(given):
        return
    differ = [
        f"{i}: {a!r} here, {b!r} in training"
        for i, (a, b) in enumerate(zip(given, trained, strict=False))
        if a != b
    ]
    io.run.note(
        f"--data {name}={spec} names its classes otherwise than the data task {name!r} was "
        f"trained on ({'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}): labels "
        "are matched by class index, so check that the classes are the same and in the same order"
    )


def _note_recorded_limit(
    path: str, manifest: dict, sizes: dict[str, int], asked: int | None
) -> None:
    """Says which tasks the run scored (``results.json``) on another number of test
    images than ``asked`` (``--test-limit``; None: the whole split): a task's limit is the
    one its data record holds, or its training phase (``io.task_phase``) saved in its
    options (``config*.yaml``).
    ``sizes``: each task's test images as loaded now; where both limits cover the
    whole split (fewer images than either), the figures are the same and nothing is said."""
    from .. import io

    recorded = {}
    for n, size in sizes.items():
        known, limit = _recorded_limit(manifest["tasks"][n], _phase_options(path, manifest, n))
        if (asked is None or size < asked) and (limit is None or limit >= size):
            continue  # both scored the whole split: the same figures
        recorded[n] = (known, limit)
    limited = {n: limit for n, (_, limit) in recorded.items() if limit and limit != asked}
    if limited:
        bounds = sorted(set(limited.values()))
        most = "-".join(str(n) for n in dict.fromkeys([bounds[0], bounds[-1]]))
        same = f"; --test-limit {bounds[0]} scores that subset" if len(bounds) == 1 else ""
        scoring = "the whole test splits" if asked is None else f"at most {asked} test images"
        io.run.note(
            f"scoring {scoring}; the run scored {', '.join(limited)} on a subset "
            f"of at most {most} test images each (its --test-limit), so these figures "
            f"differ from its results.json{same}"
        )
    whole = [n for n, (known, limit) in recorded.items() if known and limit is None]
    if asked is not None and whole:
        io.run.note(
            f"scoring at most {asked} test images per task; the run scored {', '.join(whole)} "
            "on the whole test split, so these figures differ from its results.json; leave "
            "out --test-limit to score what it scored"
        )


def _data_root(args: argparse.Namespace, manifest: dict, name: str) -> str | None:
    """Where task ``name``'s data is read from: ``--data-root``, else
    ``$MODNET_DATA_ROOT``, else the ``data_root`` its phase's saved options record
    (``config*.yaml``: absolute; an older run's relative one is read from the current
    folder); None when none is known."""
    from ..data.registry import data_root

    given = data_root(args.data_root)
    if given is not None:
        return str(given)
    recorded = (_phase_options(args.run_dir, manifest, name) or {}).get("data_root")
    return recorded if isinstance(recorded, str) and recorded else None


def _phase_options(path: str, manifest: dict, name: str) -> dict | None:
    """The options saved by the phase that trained task ``name`` (its ``config*.yaml``,
    ``io.task_phase``); None when the run has no such file or it cannot be read."""
    from .. import io
    from ..errors import ConfigError
    from ._options import config_path, read_config

    run = io.run_root(path)
    file = config_path(run, io.task_phase(run, manifest, name))
    if not file.is_file():
        return None
    try:
        return read_config(file)
    except ConfigError:
        return None


def _subset_record(record: dict) -> dict:
    """How a task's data was subset when it was loaded (its transform's ``subset``)."""
    subset = (record.get("transform") or {}).get("subset") or {}
    return subset if isinstance(subset, dict) else {}


def _recorded_seed(record: dict) -> int:
    """The seed a task's data was loaded with (its transform's ``subset`` record), else 0."""
    seed = _subset_record(record).get("seed", 0)
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 0


def _recorded_limit(record: dict, options: dict | None) -> tuple[bool, int | None]:
    """Whether the ``test_limit`` a task was scored with is known, and that limit
    (``None``: the whole split): from the task's data record (its transform's ``subset``),
    else from its phase's saved ``options`` (``_phase_options``; None: unknown). Not
    knowing it costs only the note."""
    subset = _subset_record(record)
    if "test_limit" in subset:
        limit = subset["test_limit"]
    elif options is None:
        return False, None
    else:
        limit = options.get("test_limit")
    valid = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
    return True, limit if valid else None


def _moved_data(items: list[str]) -> dict[str, str]:
    """``["mnist=npz:new.npz"]`` -> ``{"mnist": "npz:new.npz"}``; a malformed item is refused."""
    from ..errors import ConfigError

    moved = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise ConfigError(
                f"--data expects TASK=SPEC (e.g. mnist=npz:data/mnist.npz), got {item!r}"
            )
        if name.strip() in moved:
            raise ConfigError(f"--data names task {name.strip()!r} twice: give it once")
        moved[name.strip()] = spec.strip()
    return moved
