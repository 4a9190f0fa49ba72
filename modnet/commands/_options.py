"""Options shared by the commands that train (``train``, ``transfer``, ``adapt``).

A run is configured by flags, by a YAML file (``--config run.yaml``) or by both:
the file gives values, the flags given on the command line override them, and
what neither sets keeps its default. The file's keys are the long option names
with underscores (``batch_size: 32``, ``train: route,head``), except that
``model_kwargs`` (a mapping) holds what ``--model-arg KEY=VALUE`` gives and
``objective_options`` what ``--objective-arg`` gives. Where a run goes
(``--out``, the run directory) and ``--overwrite`` stay on the command line.

Every run saves its complete resolved options in that form (``RUN/config.yaml``
for ``train``, ``RUN/config-<phase>.yaml`` for a transfer or adaptation), so
``modnet train --config RUN/config.yaml --out NEW`` trains it again.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from .. import io
from ..data import portable_spec
from ..errors import ConfigError
from ..io.fs import existing_ancestor, refuse_existing
from ..train.config import OPTIMIZERS, PRECISIONS, TrainConfig
from ..train.schedule import MIXING_MODES
from ..train.tracking import LOGGERS, check_logger

DEFAULTS = TrainConfig()
CONFIG_FILE = "config.yaml"
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
MODEL_FIELDS = ("model", "model_kwargs", "tasks")  # what only `train` chooses
KEY_VALUE_OPTIONS = {"model_kwargs": "model_arg", "objective_options": "objective_options"}
NONE_MEANS = {"grad_clip": 0.0}  # a file's null for these is the flag's "off" value


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``TrainConfig`` that every training command takes.

    Every default is ``None`` here ("not given"): ``training_options`` fills in the
    config file's value or ``TrainConfig``'s default, shown in the help.
    """
    group = parser.add_argument_group("training")
    add = group.add_argument
    add("--data-root", help="folder with the datasets (default: $MODNET_DATA_ROOT)")
    add("--download", action=argparse.BooleanOptionalAction, help="let torchvision download data")
    add("--epochs", type=int, help=_default("epochs"))
    add("--batch-size", type=int, help=_default("batch_size"))
    add(
        "--micro-batch-size",
        type=int,
        help="samples per forward/backward, gradients accumulated over a batch (0: whole batch)"
        + _default("micro_batch_size"),
    )
    add(
        "--mixing",
        choices=MIXING_MODES,
        help="tasks mixed within each batch, or one task per batch in turn" + _default("mixing"),
    )
    add("--optimizer", choices=OPTIMIZERS, help=_default("optimizer"))
    add("--lr", type=float, help="templates and trunk" + _default("lr"))
    add("--route-lr", type=float, help=_default("route_lr"))
    add("--head-lr", type=float, help="(default: --lr)")
    add("--weight-decay", type=float, help=_default("weight_decay"))
    add("--momentum", type=float, help="SGD momentum" + _default("momentum"))
    add(
        "--warmup-fraction",
        type=float,
        help="share of the steps spent warming up" + _default("warmup_fraction"),
    )
    add("--label-smoothing", type=float, help=_default("label_smoothing"))
    add("--grad-clip", type=float, help="max gradient norm; 0 disables" + _default("grad_clip"))
    add("--precision", choices=PRECISIONS, help=_default("precision"))
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    add("--device", choices=("auto", "cpu", "cuda"), help=_default("device"))
    add("--seed", type=int, help=_default("seed"))
    add(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="pad-and-crop (and flips for natural images) on training images (default: off)",
    )
    add("--train-limit", type=int, help="at most this many training images per task")
    add("--test-limit", type=int, help="at most this many test images per task")
    add(
        "--eval-every",
        type=int,
        help="epochs between scoring the test splits (the learning curves); 0: only at the "
        "end, which the last epoch always is" + _default("eval_every"),
    )
    add("--eval-batch-size", type=int, help=_default("eval_batch_size"))
    add(
        "--eval-micro-batch",
        type=int,
        help="images per forward pass when scoring (default: the model family's, measured to "
        "fit the caches); 0: one pass per --eval-batch-size batch, as eval --micro-batch 0",
    )
    add(
        "--data-workers",
        type=int,
        help="DataLoader workers for image folders and shards read from disk (default: automatic)",
    )
    add(
        "--in-memory-mb",
        type=float,
        help="image folders and shards larger than this (MiB at the model's size) stay on "
        "disk and are decoded on demand" + _default("in_memory_mb"),
    )
    add("--checkpoint-every", type=int, help="steps between checkpoints (default: every epoch)")
    add("--log-every", type=int, help="steps between logged records" + _default("log_every"))
    add(
        "--log",
        choices=LOGGERS,
        help="metrics.jsonl is always written; tensorboard also writes TensorBoard event "
        "files to RUN/tensorboard/ (pip install 'modnet[tensorboard]')" + _default("log"),
    )
    add("--progress", action=argparse.BooleanOptionalAction, help="progress bar (default: on)")


def add_config_option(parser: argparse.ArgumentParser, keys: Iterable[str]) -> None:
    """``--config FILE``: options from a YAML file, overridden by the flags given.

    Args:
        parser: The command's parser, with every option in ``keys`` already added.
        keys: The keys the file may hold (see the module docstring).
    """
    parser.add_argument(
        "--config",
        metavar="FILE",
        action=ConfigFileAction,
        keys=tuple(keys),
        help="YAML file of options (keys: the option names with '_'); flags given on the "
        f"command line override it. Every run saves its own, e.g. RUN/{CONFIG_FILE}",
    )


class ConfigFileAction(argparse.Action):
    """Reads ``--config FILE`` into every option that the command line does not set.

    Options given before ``--config`` keep their value (the file fills only what is
    still unset); options given after it are parsed after it and override it.
    """

    def __init__(self, option_strings, dest, keys=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.keys = keys

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        try:
            options = read_config(values)
            for key, value in options.items():
                self._apply(parser, namespace, key, value)
        except ConfigError as error:
            parser.error(str(error))

    def _apply(self, parser, namespace, key: str, value: Any) -> None:
        if key not in self.keys:
            raise ConfigError(
                f"{key!r} in {self.dest} file is not an option of this command; "
                f"known: {', '.join(sorted(self.keys))}"
            )
        if key in KEY_VALUE_OPTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key} must be a mapping (KEY: VALUE), got {value!r}")
            dest = KEY_VALUE_OPTIONS[key]
            pairs = [f"{k}={v!r}" for k, v in value.items()]
            setattr(namespace, dest, pairs + list(getattr(namespace, dest, None) or []))
            return
        if value is None:
            value = NONE_MEANS.get(key)
        action = parser._option_string_actions.get("--" + key.replace("_", "-"))
        dest = action.dest if action is not None else key
        if value is None or getattr(namespace, dest, None) is not None:
            return
        if action is not None:
            value = _convert(action, key, value)
        setattr(namespace, dest, value)


def _convert(action: argparse.Action, key: str, value: Any) -> Any:
    """A file's value checked and converted as the flag would convert it."""
    flags = (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)
    if isinstance(action, flags):  # "no", 0, "false" are not false: a typo must not train
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    kind = action.type
    if kind is not None and not isinstance(value, kind):
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{key} must be one of {', '.join(action.choices)}, got {value!r}")
    return value


def read_config(path: str | Path) -> dict[str, Any]:
    """The options in a YAML config file, keys with ``-`` spelt ``_``.

    Raises:
        ConfigError: if the file is missing, is not text or not YAML, or is not a mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file: give a YAML file") from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def training_options(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved ``TrainConfig`` values (without the model and tasks) of a command.

    Raises:
        ConfigError: if ``--log`` names a logger that cannot run here.
    """
    values = {}
    for name in TRAIN_FIELDS:
        if name in MODEL_FIELDS:
            continue
        given = getattr(args, name, None)
        values[name] = given if given is not None else getattr(DEFAULTS, name)
    values["grad_clip"] = values["grad_clip"] or None
    if values.get("data_root"):  # saved as absolute: eval and replays read it from any folder
        values["data_root"] = str(Path(values["data_root"]).expanduser().absolute())
    check_logger(values["log"])
    return values


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The ``TrainConfig`` of a command's resolved options, with ``overrides``."""
    return TrainConfig(**{**training_options(args), **overrides})


def parse_key_values(items: Iterable[str] | None, option: str = "--model-arg") -> dict[str, Any]:
    """``["depth=8", "route=hard"]`` -> ``{"depth": 8, "route": "hard"}``.

    Values are Python literals where they parse (``8``, ``4.5``, ``True``,
    ``(1, 2)``), ``true``/``false`` in any case are booleans (as in YAML config
    files), and anything else is a string; a later key wins.

    Raises:
        ConfigError: for an item that is not ``KEY=VALUE``.
    """
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            parsed[key] = value.lower() == "true"
            continue
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``--model-arg`` pairs as model keyword arguments (see ``parse_key_values``)."""
    return parse_key_values(items, "--model-arg")


def add_model_arg_option(parser: argparse.ArgumentParser, dest: str = "model_arg") -> None:
    """``--model-arg KEY=VALUE [KEY=VALUE ...]`` (repeatable), the one spelling of model
    options in every command; ``--model-kwargs`` stays as a hidden, deprecated alias."""
    parser.add_argument(
        "--model-arg",
        dest=dest,
        action="extend",
        nargs="+",
        metavar="KEY=VALUE",
        help="model option, e.g. num_templates=8 route=hyper (repeatable)",
    )
    parser.add_argument(
        "--model-kwargs",
        dest=dest,
        action=DeprecatedExtend,
        nargs="*",
        help=argparse.SUPPRESS,
    )


class DeprecatedExtend(argparse._ExtendAction):
    """``extend``, with a warning that the option's name is deprecated."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"modnet: {option_string} is deprecated: use --model-arg KEY=VALUE",
            file=sys.stderr,
        )
        super().__call__(parser, namespace, values, option_string)


def config_path(run_dir: str | Path, phase: str) -> Path:
    """Where a phase's resolved options are saved: ``config.yaml`` for ``train``,
    ``config-<phase>.yaml`` otherwise."""
    return Path(run_dir) / (CONFIG_FILE if phase == "train" else f"config-{phase}.yaml")


def save_config(run_dir: str | Path, command: str, options: Mapping[str, Any], phase: str) -> Path:
    """Writes a run's resolved options where ``--config`` reads them back.

    Args:
        run_dir: The run directory.
        command: ``train``, ``transfer`` or ``adapt``.
        options: The resolved options (``training_options`` plus the command's own).
        phase: The phase they trained (``train``, ``transfer-kmnist``, ...): the file
            is ``config.yaml`` for ``train``, ``config-<phase>.yaml`` otherwise.

    Returns:
        The file written.
    """
    path = config_path(run_dir, phase)
    again = "--out NEW_RUN" if command == "train" else f"{run_dir} --overwrite"
    header = (
        f"{io.run.SAVED_OPTIONS_HEADER}{command}: the resolved options of this run. Run it "
        "again with\n"
        f"#   modnet {command} --config {path} {again}\n"
    )
    options = dict(options)
    # data paths relative to the current folder, made absolute: the file runs from anywhere
    for key in ("task", "target"):
        if isinstance(options.get(key), str):
            options[key] = portable_spec(options[key])
    if isinstance(options.get("tasks"), (list, tuple)):
        options["tasks"] = [portable_spec(t) if isinstance(t, str) else t for t in options["tasks"]]
    body = yaml.safe_dump(_plain(options), sort_keys=False, default_flow_style=False)
    io.atomic_write_text(path, header + body)
    return path


def saving_options(command: str, options: Mapping[str, Any], used_sources: bool = False):
    """A context in which each phase's resolved options are saved (``save_config``)
    just before its results, so a complete phase always has them (``io.run.with_results``).

    ``used_sources``: record the sources the phase used (its results entry's
    ``sources``), not the ones asked for (``modnet adapt``'s "every task with the
    target's classes" changes as the run grows).
    """

    def write(run_dir: Path, phase: str, entry: Mapping[str, Any]) -> None:
        used = dict(options)
        if used_sources:
            used["sources"] = ",".join(entry["sources"])
        save_config(run_dir, command, used, phase)

    return io.run.with_results(write)


def _plain(value: Any) -> Any:
    """Tuples as lists, so that the YAML is plain (``safe_load`` reads it back)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _default(name: str) -> str:
    return f" (default: {getattr(DEFAULTS, name)})"


def refuse_replacing(paths: Iterable[Path], overwrite: bool, option: str = "--out") -> None:
    """Refuses, before any work, to replace a file the user pointed ``option`` at, or
    to write one where it cannot be created (``check_writable``).

    A command's default outputs live in the run directory and are modnet's own; a
    file at a place the user chose may be theirs, so it is replaced only with
    ``--overwrite``.

    Raises:
        ConfigError: Naming every one of ``paths`` that exists, or the first that
            cannot be written.
    """
    paths = list(map(Path, paths))
    for folder in dict.fromkeys(p.parent for p in paths):
        check_writable(folder, option, shown=next(p for p in paths if p.parent == folder))
    if not overwrite:
        refuse_existing(paths, option, "--overwrite")


def figure_folder(
    run_dir: str | Path, out: str | None, tasks: list[str] | None, overwrite: bool, curves=False
) -> Path:
    """Where ``modnet routes`` / ``modnet plot`` write their figures, checked first.

    A run's own ``routes.png``, ``routes.txt`` and ``curves.png`` (its outputs) are
    redrawn in place; any other figure file that exists, in ``--out``, a model folder
    or the run (``routes-<task>.png`` with ``--task``), may be the user's and is
    replaced only with ``--overwrite``.

    Args:
        run_dir: The run or model directory the command reads.
        out: ``--out``, or ``None`` for ``run_dir``.
        tasks: ``--task`` (``None``: every task).
        overwrite: ``--overwrite``.
        curves: Whether ``curves.png`` is written too (``modnet plot``).

    Raises:
        CheckpointError: ``run_dir`` is a file or missing, refused as ``modnet eval``
            refuses it (``io.resolve_model_dir``), before ``--out`` is looked at.
        ConfigError: ``out`` names a file, or a figure would replace a file that
            modnet did not write.
    """
    from ..plot import CURVES_PNG, route_files

    if not Path(run_dir).is_dir():
        io.resolve_model_dir(run_dir)  # raises: "RUN is a file: give a run or model directory"
    refuse_checkpoint_folder(out or run_dir, "--out" if out else "the default --out")
    folder = check_folder(out) if out else Path(run_dir)
    if not out:
        check_writable(folder, "run directory", fix="pass --out FOLDER to write them elsewhere")
    run_outputs = not out and io.is_run_dir(folder)
    files = [] if run_outputs and not tasks else list(route_files(folder, tasks))
    if curves and not run_outputs:
        files.append(folder / CURVES_PNG)
    refuse_replacing(files, overwrite)
    return folder


def refuse_checkpoint_folder(folder: str | Path, option: str = "--out") -> None:
    """Refuses outputs inside a run's checkpoints (``RUN/checkpoints/<name>/...``),
    which modnet prunes as the run goes on, taking anything written there with them.

    Raises:
        ConfigError: Naming the folder and the fix.
    """
    folder = Path(folder).absolute()
    for parent in (folder, *folder.parents):
        if parent.name == io.run.CHECKPOINTS and io.is_run_dir(parent.parent):
            raise ConfigError(
                f"{option} {folder} is inside the checkpoints of the run {parent.parent}, "
                "which modnet prunes as the run goes on: pass --out FOLDER outside them"
            )


def check_folder(out: str | Path) -> Path:
    """``--out`` of commands that write several files into a folder, checked first.

    Raises:
        ConfigError: ``out`` is a file, or is named like one (``figs/routes.png``), or
            cannot be created or written (``check_writable``).
    """
    out = Path(out)
    if out.is_file() or (not out.exists() and out.suffix.lower() in FILE_SUFFIXES):
        raise ConfigError(f"--out {out} is a file name: give the folder the files are written into")
    return check_writable(out)


def check_writable(
    folder: str | Path,
    option: str = "--out",
    shown: str | Path | None = None,
    fix: str = "choose a folder you can write to",
) -> Path:
    """Refuses, before any work, a folder that outputs cannot be written into.

    The folder, or where it does not exist yet its nearest existing ancestor, must be
    a folder in which this process can create entries: it is tried by creating (and
    removing) an empty hidden folder there, which also catches what permission bits
    do not say (a read-only file system, ``/proc``, a user that bypasses them).

    Args:
        folder: Where the outputs go (created with its parents if missing).
        option: The option that named it, for the message (``--out``).
        shown: The path the user gave, if not ``folder`` (a file inside it).
        fix: What to do when nothing can be created there.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        ConfigError: The nearest existing ancestor is a file (or not a folder), or
            nothing can be created in it; the message names both paths and the fix.
    """
    folder = Path(folder)
    shown = folder if shown is None else Path(shown)
    ancestor = existing_ancestor(folder)
    kind = "a file" if ancestor.is_file() else "not a folder"
    if not ancestor.is_dir() and ancestor == shown:
        raise ConfigError(f"{option} {shown} is {kind}, not a folder: choose another {option}")
    if not ancestor.is_dir():
        raise ConfigError(
            f"{option} {shown} cannot be created: {ancestor} is {kind}, not a folder: "
            f"choose a path that is not inside {ancestor}"
        )
    try:
        probe = tempfile.mkdtemp(prefix=".modnet-write-test-", dir=ancestor)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(
            f"{option} {shown} cannot be written: nothing can be created in {ancestor} "
            f"({reason}): {fix}"
        ) from None
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return folder


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory ``transfer`` / ``adapt`` add a task to, checked before any work:
    not a file, and writable where it exists (a missing run is named when it is read).

    Raises:
        ConfigError: ``run_dir`` is a file, or nothing can be created in it.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} is a file, not a run directory: give the folder that "
            "`modnet train --out` wrote"
        )
    if run_dir.is_dir():
        check_writable(run_dir, "run directory", fix="copy the run to a folder you can write to")
    return run_dir


FILE_SUFFIXES = (".png", ".txt", ".pdf", ".svg", ".jpg", ".csv", ".json")


def accuracy_table(accuracy: dict[str, float], classes: dict[str, int]) -> str:
    """The per-task accuracy table printed at the end of a run."""
    width = max([4, *map(len, accuracy)])
    lines = [f"{'task':<{width}}  classes  chance  accuracy", "-" * (width + 27)]
    for task, value in accuracy.items():
        count = classes[task]
        lines.append(f"{task:<{width}}  {count:7d}  {1 / count:6.3f}  {value:8.4f}")
    return "\n".join(lines)
