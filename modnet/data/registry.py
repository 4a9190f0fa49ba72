"""``load_task``: from a spec string to TaskData, and the registry of dataset names.

Spec forms:

- a registered name: ``mnist``, ``fashion_mnist``, ``kmnist``, ``usps``,
  ``cifar10``, ``cifar100``, ``svhn``, ``mnist_m`` (read from the data root),
  or a name added with ``register_dataset``;
- ``npz:PATH.npz``: an npz archive (see ``modnet.data.arrays``);
- ``folder:DIR``: an image folder with ``train/`` and ``test/`` (or ``val/``);
- ``shards:DIR``: WebDataset tar shards of both splits (see ``modnet.data.shards``);
- ``synth_<attribute>[-<modifier>...]``: the built-in synthetic suite
  (see ``modnet.data.synthetic``).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path

from .arrays import load_folder, load_npz
from .augment import augment_record, set_policy
from .errors import DataError
from .options import IN_MEMORY_MB, LoadOptions
from .shards import load_shards
from .synthetic import ATTRIBUTES, is_synthetic, load_synthetic
from .task_data import TASK_NAME, TaskData
from .torchvision_sets import ROOT_DATASETS, load_root_dataset

ENV_ROOT = "MODNET_DATA_ROOT"
Loader = Callable[[str, LoadOptions], TaskData]

# Other spellings people type; the task is named by the canonical name.
ALIASES = {
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fmnist": "fashion_mnist",
    "mnist-m": "mnist_m",
    "mnistm": "mnist_m",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "k-mnist": "kmnist",
}

# The one registry: built-in names, then whatever register_dataset adds.
_LOADERS: dict[str, Loader] = {name: load_root_dataset for name in ROOT_DATASETS}


def data_root(root: str | Path | None = None) -> Path | None:
    """The data root: ``root`` if given, else ``$MODNET_DATA_ROOT`` if set, else None."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(ENV_ROOT, "").strip()
    return Path(env).expanduser() if env else None


def list_datasets() -> list[str]:
    """Names ``load_task`` knows: registered datasets and the synthetic tasks (no modifiers).

    Files and folders are loaded by path with ``npz:PATH``, ``folder:DIR`` and
    ``shards:DIR``.
    """
    return sorted(_LOADERS) + [f"synth_{a}" for a in ATTRIBUTES]


def register_dataset(
    name: str, loader: Loader, *, replace: bool = False, augment: str | None = None
) -> None:
    """Makes ``load_task(name)`` call ``loader(name, options)``.

    The extension point for datasets modnet does not know. The loader gets the
    spec and a ``LoadOptions`` (size, channels, root, download, limits, seed,
    resize) and returns a TaskData at ``options.img_size`` and
    ``options.in_chans``; ``modnet.data.task_from_arrays`` does the conversion,
    subsets and record from raw arrays.

    Args:
        name: The spec (and usual task name): letters, digits, ``_`` and ``-``.
        loader: ``loader(spec: str, options: LoadOptions) -> TaskData``.
        replace: Allow replacing a registered loader (including built-ins).
        augment: Training augmentation policy (``modnet.data.augment``):
            ``"crop_flip"`` for natural images, ``"crop"`` (the default for
            unknown data) where a mirror image changes the label, or ``"none"``.
    """
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise DataError(
            f"invalid dataset name {name!r}: use letters, digits, '_' and '-', starting with a "
            "letter or digit (it names the task)"
        )
    if is_synthetic(name.lower()):
        raise DataError(
            f"dataset names starting with 'synth' are the synthetic suite's: rename {name!r}"
        )
    if not callable(loader):
        raise DataError(f"the loader for {name!r} must be callable, got {type(loader).__name__}")
    if name in _LOADERS and not replace:
        raise DataError(
            f"dataset {name!r} is already registered: pass replace=True to replace its loader"
        )
    if augment is not None:
        set_policy(name, augment)
    _LOADERS[name] = loader


def unregister_dataset(name: str) -> None:
    """Removes a dataset added with ``register_dataset`` (e.g. at the end of a test)."""
    if name in ROOT_DATASETS:
        raise DataError(f"{name!r} is built in and cannot be removed; replace it instead")
    _LOADERS.pop(name, None)


def load_task(
    spec: str,
    *,
    img_size: int = 32,
    in_chans: int = 3,
    root: str | Path | None = None,
    download: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    resize: str = "bilinear",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: bool = False,
    in_memory_mb: float | None = IN_MEMORY_MB,
) -> TaskData:
    """Loads a task's data at the model's size and channels (see the module docstring).

    Args:
        spec: Dataset name, ``npz:PATH``, ``folder:DIR``, ``shards:DIR`` or ``synth_...``.
        img_size: The model's image side.
        in_chans: The model's input channels (1 or 3).
        root: Data root; default ``$MODNET_DATA_ROOT``.
        download: Let torchvision download missing files into the root.
        train_limit: At most this many training images (seeded and class balanced;
            for the synthetic suite, the number generated).
        test_limit: Likewise for the test split.
        seed: Seed of the subsets and of synthetic data.
        resize: Interpolation mode when sizes differ: bilinear, bicubic, area or nearest.
        mean: Per-channel mean to normalise with instead of the data's own
            (e.g. a trained task's, to evaluate it on new data unchanged).
        std: Per-channel std, with ``mean``.
        augment: Record the dataset's training augmentation policy in the
            task's transform record (``record["augment"]``, see
            ``modnet.data.augment``); the training loop applies it.
        in_memory_mb: Image folders and shards larger than this (MiB at the
            model's size) stay on disk and are decoded on demand; None: always in memory.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"a dataset spec must be a non-empty string, got {spec!r}")
    if (mean is None) != (std is None):
        raise DataError("give both mean and std to override the normalisation, or neither")
    options = LoadOptions(
        img_size=img_size,
        in_chans=in_chans,
        root=data_root(root),
        download=download,
        train_limit=train_limit,
        test_limit=test_limit,
        seed=seed,
        resize=resize,
        in_memory_mb=in_memory_mb,
    )
    spec = spec.strip()
    task = _dispatch(spec, options)
    if not isinstance(task, TaskData):
        raise DataError(
            f"the loader of {spec!r} returned {type(task).__name__}, not TaskData: build it with "
            "modnet.data.task_from_arrays"
        )
    if task.img_size != img_size or task.in_chans != in_chans or task.train_x.shape[-2] != img_size:
        raise DataError(
            f"the loader of {spec!r} returned {task.in_chans}x{task.train_x.shape[-2]}x"
            f"{task.img_size} images, not {in_chans}x{img_size}x{img_size}: loaders must honour "
            "options.img_size and options.in_chans (task_from_arrays does)"
        )
    if mean is not None:
        task = task.with_normalization(list(mean), list(std))
    if augment:
        task.transform["augment"] = augment_record(task.transform)
    return task


PATH_READERS = {"npz": load_npz, "folder": load_folder, "shards": load_shards}


def portable_spec(spec: str) -> str:
    """The spec a run records: a path relative to the current folder made absolute.

    A run is evaluated, resumed and transferred from any folder, so ``npz:d.npz``
    given in ``/data/work`` is recorded as ``npz:/data/work/d.npz``. Names, absolute
    paths and paths found only under the data root are kept as given (the data root
    is an option of every command), as is a path ending in ``.`` or ``..``, whose
    task is named after the path as written.
    """
    scheme, _, rest = spec.strip().partition(":")
    if not rest or scheme.lower() not in PATH_READERS:
        return spec
    path = Path(rest).expanduser()
    if path.is_absolute() or not path.exists():
        return spec
    absolute = Path(os.path.abspath(path))
    return f"{scheme}:{absolute}" if absolute.name == path.name else spec


def _dispatch(spec: str, options: LoadOptions) -> TaskData:
    scheme, _, rest = spec.partition(":")
    if rest and scheme.lower() in PATH_READERS:
        return PATH_READERS[scheme.lower()](_resolve_path(rest, options.root), options)
    if spec in _LOADERS:
        return _LOADERS[spec](spec, options)
    name = ALIASES.get(spec.lower(), spec.lower())
    if is_synthetic(name):
        return load_synthetic(name, options)
    if name in _LOADERS:
        return _LOADERS[name](name, options)
    known = list_datasets()
    close = difflib.get_close_matches(name, known + list(ALIASES), n=1)
    hint = f" (did you mean {ALIASES.get(close[0], close[0])!r}?)" if close else ""
    path = _resolve_path(spec, options.root)
    if spec.lower().endswith(".npz") or path.is_file():
        hint = f" (a file is given with its reader: did you mean 'npz:{spec}'?)"
    elif path.is_dir():
        hint = f" (a folder is given with its reader: 'folder:{spec}' or 'shards:{spec}')"
    raise DataError(
        f"unknown dataset {spec!r}{hint}: known are {summarize_names(known)}; or give "
        "'npz:PATH.npz', 'folder:DIR' (train/ and test/ class subfolders) or 'shards:DIR' "
        "(WebDataset tars); synthetic tasks take modifiers -bg, -color, -noise, -holdout; "
        "register others with modnet.data.register_dataset"
    )


def summarize_names(names: list[str]) -> str:
    """Dataset names for a one-line message, variants folded into their bases.

    ``mnist, mnist-shear, usps, usps-shear`` reads ``mnist, usps (each also as
    NAME-shear)``: the corrupted digit sets alone are 16 names.
    """
    bases = set(names)
    variants: dict[str, set[str]] = {}
    for name in names:
        base, dash, suffix = name.partition("-")
        if dash and base in bases:
            variants.setdefault(suffix, set()).add(base)
    shared = {s: group for s, group in sorted(variants.items()) if len(group) > 1}
    folded = {f"{b}-{s}" for s, group in shared.items() for b in group}
    by_bases: dict[tuple[str, ...], list[str]] = {}
    for suffix, group in shared.items():
        by_bases.setdefault(tuple(sorted(group)), []).append(suffix)
    parts = "".join(
        f" ({', '.join(group)} each also as NAME-{', -'.join(suffixes)})"
        for group, suffixes in by_bases.items()
    )
    return ", ".join(n for n in names if n not in folded) + parts


def _resolve_path(text: str, root: Path | None) -> Path:
    """A path as given, or under the data root when it is relative and only exists there."""
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists() and root is not None and (root / path).exists():
        return root / path
    return path
