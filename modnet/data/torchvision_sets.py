"""Standard datasets read from a data root: torchvision's layouts, or npz copies.

The data root is a folder laid out as torchvision expects (``MNIST/raw/...``,
``usps.bz2``, ``cifar-10-batches-py/...``); ``download=True`` lets torchvision
fetch missing files into it where internet is available. MNIST-M has no
torchvision class and is read from ``mnist_m_subset.npz`` or ``mnist_m.npz``;
CIFAR-10 falls back to ``cifar10_subset.npz`` or ``cifar10.npz`` when its
torchvision folder is absent. Files are read once and the whole split is held
as a uint8 tensor: these datasets are small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import load_npz
from .build import task_from_arrays
from .errors import DataError
from .options import LoadOptions
from .task_data import TaskData

ROOT_HINT = (
    "pass --data-root DIR (root=DIR in Python) or set the MODNET_DATA_ROOT environment variable"
)
DIGITS = tuple(str(d) for d in range(10))


def _idx(folder: str) -> tuple[str, ...]:
    return tuple(
        f"{folder}/raw/{f}"
        for f in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )


@dataclass(frozen=True)
class RootDataset:
    """A dataset read from the data root.

    Attributes:
        name: Spec and task name.
        title: Name in messages.
        files: Paths under the root that torchvision reads.
        torchvision: Class in ``torchvision.datasets``; None when only npz files exist.
        npz: npz files in the root to use when ``files`` are absent, in order.
        classes: Class names when torchvision gives none.
    """

    name: str
    title: str
    files: tuple[str, ...] = ()
    torchvision: str | None = None
    npz: tuple[str, ...] = ()
    classes: tuple[str, ...] | None = None


ROOT_DATASETS = {
    d.name: d
    for d in (
        RootDataset("mnist", "MNIST", _idx("MNIST"), "MNIST"),
        RootDataset("fashion_mnist", "Fashion-MNIST", _idx("FashionMNIST"), "FashionMNIST"),
        RootDataset("kmnist", "Kuzushiji-MNIST", _idx("KMNIST"), "KMNIST"),
        RootDataset("usps", "USPS", ("usps.bz2", "usps.t.bz2"), "USPS", classes=DIGITS),
        RootDataset(
            "cifar10",
            "CIFAR-10",
            tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
            + ("cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"),
            "CIFAR10",
            npz=("cifar10_subset.npz", "cifar10.npz"),
            classes=(
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ),  # fmt: skip
        ),
        RootDataset(
            "cifar100",
            "CIFAR-100",
            ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
            "CIFAR100",
        ),
        RootDataset("svhn", "SVHN", ("train_32x32.mat", "test_32x32.mat"), "SVHN", classes=DIGITS),
        RootDataset(
            "mnist_m", "MNIST-M", npz=("mnist_m_subset.npz", "mnist_m.npz"), classes=DIGITS
        ),
    )
}


def _fetch_hint(dataset: RootDataset) -> str:
    if dataset.torchvision:
        return (
            "or add --download (download=True) to let torchvision fetch them where internet "
            "is available"
        )
    return (
        f"modnet cannot download {dataset.title}: save it as an npz archive with train_x, "
        "train_y, test_x, test_y (see modnet.data.arrays)"
    )


def load_root_dataset(name: str, options: LoadOptions) -> TaskData:
    """Loads one of ``ROOT_DATASETS`` from ``options.root``."""
    dataset = ROOT_DATASETS[name]
    wanted = " or ".join([*dataset.files[:1], *dataset.npz[:1]])
    root = options.root
    if root is None:
        action = "download into" if options.download else "read from"
        raise DataError(
            f"{dataset.title} needs a data root to {action}, and none was given: {ROOT_HINT} "
            f"to the folder that holds {wanted} (and the rest of its files); "
            f"{_fetch_hint(dataset)}"
        )
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(
            f"the data root {root} is a file, not a folder: {ROOT_HINT} to the folder that "
            f"holds {wanted} (and the rest of {dataset.title}'s files)"
        )
    present = bool(dataset.files) and all((root / f).is_file() for f in dataset.files)
    if present or (dataset.torchvision and options.download and not _first_npz(root, dataset)):
        return _load_torchvision(dataset, root, options)
    npz = _first_npz(root, dataset)
    if npz is not None:
        source = {"dataset": dataset.name, "path": str(npz)}
        return load_npz(npz, options, name=dataset.name, source=source, classes=dataset.classes)
    if not root.is_dir():
        raise DataError(
            f"the data root {root} does not exist: {ROOT_HINT} to the folder that holds "
            f"{wanted} (and the rest of {dataset.title}'s files); {_fetch_hint(dataset)}"
        )
    looked = []
    if dataset.files:
        missing = [f for f in dataset.files if not (root / f).is_file()]
        which = "none is there" if len(missing) == len(dataset.files) else "missing: "
        which += ", ".join(missing) if len(missing) < len(dataset.files) else ""
        looked.append(f"the torchvision files {', '.join(dataset.files)} ({which})")
    if dataset.npz:
        looked.append(" or ".join(dataset.npz))
    raise DataError(
        f"{dataset.title} not found in the data root {root}: looked there for "
        f"{'; or for '.join(looked)}. Put the files there or point the data root at the "
        f"folder that holds them ({ROOT_HINT}); {_fetch_hint(dataset)}"
    )


def _first_npz(root: Path, dataset: RootDataset) -> Path | None:
    return next((root / f for f in dataset.npz if (root / f).is_file()), None)


def _load_torchvision(dataset: RootDataset, root: Path, options: LoadOptions) -> TaskData:
    import torchvision.datasets as tv

    cls = getattr(tv, dataset.torchvision)
    splits = []
    for train in (True, False):
        kwargs: dict[str, Any] = (
            {"split": "train" if train else "test"} if dataset.name == "svhn" else {"train": train}
        )
        try:
            splits.append(cls(str(root), download=options.download, **kwargs))
        except ImportError as error:
            raise DataError(
                f"reading {dataset.title} needs a package that is not installed ({error}): "
                "install it (SVHN's .mat files need scipy: pip install scipy)"
            ) from None
        except (
            RuntimeError, OSError, ValueError, EOFError, TypeError, IndexError, KeyError,
            AssertionError,  # torchvision's IDX reader asserts on bad headers
        ) as error:  # fmt: skip
            raise DataError(
                f"could not read {dataset.title} from {root} ({error}): the files may be "
                f"incomplete or corrupt; replace them, {_fetch_hint(dataset)} (after deleting "
                "the broken ones)"
            ) from None
    train, test = splits
    classes = dataset.classes or getattr(train, "classes", None)
    return task_from_arrays(
        dataset.name,
        _images(train),
        _labels(train),
        _images(test),
        _labels(test),
        options,
        source={"dataset": dataset.name, "root": str(root), "torchvision": dataset.torchvision},
        channels_last=dataset.name in ("cifar10", "cifar100"),
        classes=list(classes) if classes else None,
    )


def _images(ds: Any) -> Any:
    data = ds.data
    return np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data


def _labels(ds: Any) -> Any:
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    return np.asarray(labels, dtype=np.int64) if isinstance(labels, list) else labels
