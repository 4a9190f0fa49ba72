"""From raw arrays to TaskData: validation, subsets, conversion, statistics, record.

Every loader ends here, user loaders included (``task_from_arrays``), so every
dataset is checked and converted the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .files import ImageFiles
from .options import LoadOptions
from .subset import balanced_indices, derive_seed, warn_missing_classes
from .task_data import TaskData
from .transform import as_nchw, channel_stats, convert_images, make_record

# Normalisation statistics come from a fixed sample of the full training split,
# not from the (seeded, limited) subset, so a task evaluated later with other
# limits or seeds is normalised exactly as it was trained.
STATS_SAMPLE = 2000
STATS_SEED = 0


def as_labels(labels: Any, what: str) -> torch.Tensor:
    """Integer labels (array, tensor or list) as an int64 [N] tensor."""
    if isinstance(labels, np.ndarray):
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"{what} must hold integer class indices, got dtype {labels.dtype}: "
                "convert them (e.g. labels.astype(np.int64))"
            )
        labels = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))
    elif not torch.is_tensor(labels):
        labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise DataError(
            f"{what} must hold integer class indices, got {labels.dtype}: convert them to int64"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise DataError(f"{what} must be one label per image, shape [N], got {tuple(labels.shape)}")
    return labels.to(torch.int64)


def check_label_outliers(name: str, labels: torch.Tensor) -> None:
    """Refuses labels that look like a mistake: one value far above all the others.

    The number of classes is inferred as the largest label + 1, so a single stray
    label (e.g. 255 for "unknown" among 0..9) would silently create a huge head of
    mostly empty classes. Refused when the largest label is more than twice the
    next largest distinct label + 1 and most classes would then have no sample.

    Raises:
        DataError: Naming the value, how many samples carry it and the next label.
    """
    values, counts = torch.unique(labels, return_counts=True)
    if len(values) < 2:
        return
    top, second = int(values[-1]), int(values[-2])
    classes = top + 1
    empty = classes - len(values)
    if top > 2 * (second + 1) and empty > classes // 2:
        raise DataError(
            f"{name}: label {top} (carried by {int(counts[-1])} samples) lies far above every "
            f"other label (the next is {second}), so {empty} of the {classes} classes it implies "
            "would have no sample: fix or drop those samples, or pass num_classes explicitly"
        )


def check_labels(
    name: str,
    train_y: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None,
    classes: Sequence[str] | None = None,
) -> int:
    """Checks that both splits are non-empty, labels are 0..K-1 (K: the named classes,
    ``num_classes``, or else inferred, when some sample must have label 0) and every
    test class has training samples (a head cannot learn a class it never sees);
    returns K."""
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) == 0:
            raise DataError(
                f"{name}: the {split} split is empty: the dataset needs at least one {split} image"
            )
    low = int(min(train_y.min(), test_y.min()))
    high = int(max(train_y.max(), test_y.max()))
    if classes is not None:  # named classes are the classes, as for image folders
        if num_classes is not None and num_classes != len(classes):
            raise DataError(
                f"{name}: {len(classes)} class names for {num_classes} classes: give one name "
                "per class"
            )
        num_classes = len(classes)
    if num_classes is None:
        if low > 0:  # class 0 empty in both splits: labels counted from 1, most likely
            raise DataError(
                f"{name}: no sample has label 0 (labels span {low}..{high}), so class 0 would "
                "be empty and chance wrong: labels must be class indices 0..K-1 (subtract "
                f"{low} if they start at {low}), or name every class to keep empty ones (a "
                "'classes' array in an npz archive, classes= or num_classes= in Python)"
            )
        num_classes = high + 1
        check_label_outliers(name, torch.cat([train_y, test_y]))
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{name}: labels span {low}..{high}, outside 0..{num_classes - 1}: labels must be "
            "class indices 0..num_classes-1 (remap them, e.g. with np.unique(y, "
            "return_inverse=True))"
        )
    unseen = np.setdiff1d(test_y.unique().numpy(), train_y.unique().numpy()).tolist()
    if unseen:
        named = [f"{c} ({classes[c]})" if c < len(classes or ()) else str(c) for c in unseen[:5]]
        more = f" and {len(unseen) - 5} more" if len(unseen) > 5 else ""
        raise DataError(
            f"{name}: the test split has {'class' if len(unseen) == 1 else 'classes'} "
            f"{', '.join(named)}{more} that no training "
            "sample has: every test class needs training samples (add them, or drop those "
            "test samples)"
        )
    return num_classes


def task_from_arrays(
    name: str,
    train_x: torch.Tensor | np.ndarray,
    train_y: Any,
    test_x: torch.Tensor | np.ndarray,
    test_y: Any,
    options: LoadOptions,
    *,
    source: dict[str, Any],
    channels_last: bool = False,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
) -> TaskData:
    """A TaskData from raw uint8 images and integer labels of both splits.

    The helper for user loaders (see ``register_dataset``): it validates the
    arrays, takes the seeded class-balanced subsets of ``options``, converts the
    images to the model's size and channels and records how.

    Args:
        name: Task name.
        train_x: uint8 images, [N, H, W], [N, C, H, W], or [N, H, W, C] with ``channels_last``.
        train_y: Integer labels 0..K-1, [N].
        test_x: Like ``train_x``.
        test_y: Like ``train_y``.
        options: Target size, channels, limits and seed.
        source: What the data is (``{"dataset": ..., "spec": ...}``), kept in the record.
        channels_last: Images are [N, H, W, C].
        num_classes: Number of classes; default: largest label + 1.
        classes: Class names, kept in the record.
    """
    images = {}
    for split, x in (("train", train_x), ("test", test_x)):
        try:
            images[split] = as_nchw(x, channels_last)
        except DataError as error:
            raise DataError(f"{name}: {split}_x: {error}") from None
    labels = {
        "train": as_labels(train_y, f"{name}: train_y"),
        "test": as_labels(test_y, f"{name}: test_y"),
    }
    for split in ("train", "test"):
        if len(images[split]) != len(labels[split]):
            raise DataError(
                f"{name}: {split}_x has {len(images[split])} images but {split}_y has "
                f"{len(labels[split])} labels: give one label per image"
            )
    # the splits may differ in size: both are converted to the target size
    same_size = images["train"].shape[-2:] == images["test"].shape[-2:]
    size = list(images["train"].shape[-2:]) if same_size else None
    num_classes = check_labels(name, labels["train"], labels["test"], num_classes, classes)
    warn_missing_classes(name, labels["train"], options.train_limit)
    picked = {}
    for split in ("train", "test"):
        limit = getattr(options, f"{split}_limit")
        index = balanced_indices(labels[split], limit, derive_seed(options.seed, split))
        picked[split] = (
            (images[split], labels[split])
            if index is None
            else (images[split][index], labels[split][index])
        )
    stats_index = balanced_indices(labels["train"], STATS_SAMPLE, STATS_SEED)
    stats_x = images["train"] if stats_index is None else images["train"][stats_index]
    return build_task(
        name,
        *picked["train"],
        *picked["test"],
        options,
        source=source,
        source_size=size,
        source_chans=images["train"].shape[1],
        num_classes=num_classes,
        classes=classes,
        stats_x=stats_x,
    )


def build_task(
    name: str,
    train_x: Any,
    train_y: torch.Tensor,
    test_x: Any,
    test_y: torch.Tensor,
    options: LoadOptions,
    *,
    source: dict[str, Any],
    source_size: Sequence[int] | None,
    source_chans: int,
    num_classes: int,
    classes: Sequence[str] | None = None,
    stats_x: Any = None,
    extra_record: dict[str, Any] | None = None,
) -> TaskData:
    """Converts already validated and subset raw splits and records how.

    ``stats_x`` (raw images, default: the training split) gives the mean and std.
    Splits given as ``ImageFiles`` stay on disk (they convert when read); they
    need ``stats_x``.
    """
    size, chans = options.img_size, options.in_chans

    def convert(images: Any) -> torch.Tensor | ImageFiles:
        if isinstance(images, ImageFiles):  # converted when read
            return images
        return convert_images(images, size, chans, options.resize)

    train, test = convert(train_x), convert(test_x)
    stats_images = (
        train if stats_x is None else convert_images(stats_x, size, chans, options.resize)
    )
    mean, std = channel_stats(stats_images)
    record = make_record(
        source=source,
        source_size=source_size,
        source_chans=source_chans,
        img_size=size,
        in_chans=chans,
        resize=options.resize,
        mean=mean,
        std=std,
        classes=classes,
        stats_images=len(stats_images),
        subset={
            "seed": options.seed,
            "train_limit": options.train_limit,
            "test_limit": options.test_limit,
            "train_size": len(train),
            "test_size": len(test),
        },
        **(extra_record or {}),
    )
    return TaskData(name, num_classes, train, train_y, test, test_y, record)
