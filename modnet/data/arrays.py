"""Datasets given by path: ``npz:FILE.npz`` archives and ``folder:DIR`` image folders.

An npz archive holds ``train_x``, ``train_y``, ``test_x`` and ``test_y``:
uint8 images (N, H, W) or (N, H, W, C) and integer labels (N,), plus
optionally ``classes`` (class names). An image folder holds ``train/`` and
``test/`` (or ``val/``), each with one subfolder of images per class, as
torchvision's ``ImageFolder`` expects; classes are the sorted folder names.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .build import STATS_SAMPLE, STATS_SEED, build_task, check_labels, task_from_arrays
from .errors import DataError
from .files import ImageFiles
from .options import LoadOptions
from .subset import balanced_indices, derive_seed, warn_missing_classes
from .task_data import TaskData, valid_task_name

NPZ_KEYS = ("train_x", "train_y", "test_x", "test_y")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def load_npz(
    path: str | Path,
    options: LoadOptions,
    *,
    name: str | None = None,
    source: dict[str, Any] | None = None,
    classes: list[str] | tuple[str, ...] | None = None,
) -> TaskData:
    """Loads an npz archive of both splits (see the module docstring for its arrays).

    Args:
        path: The ``.npz`` file.
        options: Target size, channels, limits and seed.
        name: Task name; default: the file's stem made valid.
        source: Record of the source; default ``{"dataset": "npz", "path": ...}``.
        classes: Class names when the archive has no ``classes`` array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"no npz file at {path}: check the path (relative paths are read from the current "
            "folder, then from the data root)"
        )
    if not zipfile.is_zipfile(path):  # np.load would try it as .npy or a pickle
        raise DataError(
            f"cannot read {path} as an npz archive: it is not one (not a zip file of arrays): "
            "write it with numpy.savez(path, train_x=..., train_y=..., test_x=..., test_y=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(
            f"cannot read {path} as an npz archive ({error}): write it with "
            "numpy.savez(path, train_x=..., train_y=..., test_x=..., test_y=...)"
        ) from None
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks the arrays {missing} (it has {sorted(arrays)}): an npz dataset needs "
            "train_x, test_x (uint8, (N, H, W) or (N, H, W, C)) and train_y, test_y "
            "(integer labels, (N,))"
        )
    name = name or valid_task_name(path.stem)
    if "classes" in arrays:
        # names saved as bytes (numpy's S dtype) read as text, not "b'cat'"
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in arrays["classes"]]
    return task_from_arrays(
        name,
        arrays["train_x"],
        arrays["train_y"],
        arrays["test_x"],
        arrays["test_y"],
        options,
        source=source or {"dataset": "npz", "path": str(path)},
        channels_last=True,
        classes=classes,
    )


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(split_dir: Path, classes: list[str]) -> tuple[list[str], torch.Tensor]:
    """Every image under each class folder (recursively, sorted) and its class index.

    Paths stay strings (``os.walk``), not ``Path`` objects: a folder of a
    million images is listed without a million objects.
    """
    files: list[str] = []
    counts: list[int] = []
    for cls in classes:
        folder = split_dir / cls
        found: list[str] = []
        for parent, dirs, names in os.walk(folder):
            dirs.sort()
            found += [
                os.path.join(parent, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
            ]
        found.sort()
        files += found
        counts.append(len(found))
    labels = torch.repeat_interleave(torch.arange(len(classes)), torch.tensor(counts))
    return files, labels


def load_folder(path: str | Path, options: LoadOptions, *, name: str | None = None) -> TaskData:
    """Loads an image folder with ``train/`` and ``test/`` (or ``val/``) class subfolders.

    Classes are the sorted subfolder names of ``train/``, each of which must hold
    images (an empty one is refused, as torchvision's ``ImageFolder`` refuses it);
    the images are read as ``load_images`` says (decoded only where used; on disk
    above ``options.in_memory_mb``).
    """
    root = Path(path)
    layout = (
        f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> "
        "(or val/ instead of test/), one subfolder per class"
    )
    if not root.is_dir():
        raise DataError(f"no folder at {root}: check the path; {layout}")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    absent = ["train/"] if not train_dir.is_dir() else []
    absent += ["test/ (or val/)"] if test_dir is None else []
    if absent:
        raise DataError(f"{root} lacks {' and '.join(absent)}: {layout}")
    classes = _class_folders(train_dir)
    if not classes:
        raise DataError(f"{train_dir} has no class subfolders: {layout}")
    unknown = sorted(set(_class_folders(test_dir)) - set(classes))
    if unknown:
        raise DataError(
            f"{test_dir} has classes {unknown} that {train_dir} lacks: every test class needs "
            "training images (add them or remove those folders)"
        )
    name = name or valid_task_name(root.name)
    train_files, train_y = _image_files(train_dir, classes)
    test_files, test_y = _image_files(test_dir, classes)
    for split, files, folder in (("train", train_files, train_dir), ("test", test_files, test_dir)):
        if not files:
            raise DataError(
                f"{name}: the {split} split is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) "
                f"in the class folders of {folder}"
            )
    held = torch.bincount(train_y, minlength=len(classes))
    empty = [c for c, count in zip(classes, held.tolist(), strict=True) if count == 0]
    if empty:  # as torchvision's ImageFolder: a class folder without images is no class
        them = "it" if len(empty) == 1 else "them"
        raise DataError(
            f"{train_dir} has class {'folder' if len(empty) == 1 else 'folders'} {empty} "
            f"holding no images ({', '.join(IMAGE_EXTENSIONS)}), so the task would have "
            f"{len(classes)} classes of which {len(empty)} no training image shows: remove "
            f"{them} or add images to {them}"
        )
    size, chans, resize = options.img_size, options.in_chans, options.resize
    train = ImageFiles(train_files, size, chans, resize), train_y
    test = ImageFiles(test_files, size, chans, resize), test_y
    del train_files, test_files  # the paths live on in numpy arrays, not Python strings
    return load_images(
        name,
        train,
        test,
        options,
        source={"dataset": "folder", "path": str(root), "test_folder": test_dir.name},
        classes=classes,
    )


def load_images(
    name: str,
    train: tuple[ImageFiles, torch.Tensor],
    test: tuple[ImageFiles, torch.Tensor],
    options: LoadOptions,
    *,
    source: dict[str, Any],
    classes: list[str] | None = None,
) -> TaskData:
    """A task from images on disk (every image of each split and its label).

    Only the images of the (seeded, class-balanced) subsets and of the
    statistics sample are decoded, so a limited run on a large dataset is quick.
    When the chosen images would take more than ``options.in_memory_mb`` at the
    model's size, both splits stay on disk as ``ImageFiles``, decoded on demand
    (the statistics still come from a fixed sample of the training images).

    Args:
        name: The task's name.
        train: All training images and their int64 labels [N].
        test: All test images and their labels [M].
        options: Size, channels, limits, seed and the in-memory threshold.
        source: The record of where the images came from.
        classes: Class names (their count is the number of classes); None: the
            largest label + 1 classes, unnamed.

    Raises:
        DataError: Labels outside the classes, an image that cannot be read.
    """
    num_classes = check_labels(
        name, train[1], test[1], None if classes is None else len(classes), classes
    )
    everything = train[0]
    warn_missing_classes(name, train[1], options.train_limit)
    picked = {}
    for split, (files, labels) in (("train", train), ("test", test)):
        limit = getattr(options, f"{split}_limit")
        index = balanced_indices(labels, limit, derive_seed(options.seed, split))
        if index is not None:
            files, labels = files.subset(index), labels[index]
        picked[split] = (files, labels)
    image_bytes = options.in_chans * options.img_size**2
    total_mb = sum(len(x) for x, _ in picked.values()) * image_bytes / 2**20
    on_disk = options.in_memory_mb is not None and total_mb > options.in_memory_mb
    decoded: dict[tuple[str, int], torch.Tensor] = {}

    def raw(files: ImageFiles) -> list[torch.Tensor]:
        keys = [files.key(i) for i in range(len(files))]
        for i, key in enumerate(keys):
            if key not in decoded:
                decoded[key] = files.decode(i)
        return [decoded[key] for key in keys]

    stats_index = balanced_indices(train[1], STATS_SAMPLE, STATS_SEED)
    stats_x = raw(everything if stats_index is None else everything.subset(stats_index))
    if not on_disk:
        picked = {split: (raw(x), y) for split, (x, y) in picked.items()}
    shapes = {tuple(t.shape) for t in decoded.values()}
    sizes = {s[1:] for s in shapes}
    return build_task(
        name,
        *picked["train"],
        *picked["test"],
        options,
        source=source,
        source_size=list(next(iter(sizes))) if len(sizes) == 1 else None,
        source_chans=max(s[0] for s in shapes),
        num_classes=num_classes,
        classes=classes,
        stats_x=stats_x,
        extra_record={"storage": "files" if on_disk else "memory"},
    )
