"""TaskData: one task's images and labels, ready for the model, with the record of how."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DataError
from .files import ImageFiles

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
# Task names become file and folder names (tasks/<name>.safetensors, checkpoint folders
# named after a transfer's task plus a temporary suffix); file names are limited to 255.
MAX_TASK_NAME = 100


def valid_task_name(text: str) -> str:
    """``text`` made into a valid task name: other characters become ``_``.

    How file and folder names (``npz:``/``folder:`` specs) become task names.
    """
    name = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).lstrip("_-")
    return name or "task"


@dataclass(repr=False, eq=False)
class TaskData:
    """A task's train and test splits as uint8 tensors at the model's size.

    Images stay uint8 (4x smaller than float, and indexing a batch is a copy of
    bytes); ``normalize`` turns a batch into model input when it is used. A
    split too large for memory is an ``ImageFiles`` instead of a tensor: it
    indexes the same way, decoding the files it is asked for.

    Attributes:
        name: Task name (letters, digits, ``_`` and ``-``): the model's task.
        num_classes: Size of the classifier; labels are 0..num_classes-1.
        train_x: uint8 [N, C, H, W] training images (a tensor or ``ImageFiles``).
        train_y: int64 [N] training labels.
        test_x: uint8 [M, C, H, W] test images (a tensor or ``ImageFiles``).
        test_y: int64 [M] test labels.
        transform: JSON-serialisable record of the preprocessing (see
            ``modnet.data.transform``): source, sizes, channel conversion,
            resize mode, mean and std. ``apply_transform`` repeats it.
    """

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    transform: dict[str, Any]

    def __post_init__(self) -> None:
        self.validate()

    # -------------------------------------------------------------- properties
    @property
    def in_chans(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def img_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def mean(self) -> list[float]:
        return list(self.transform["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.transform["std"])

    @property
    def in_memory(self) -> bool:
        """Both splits are tensors in memory (not ``ImageFiles`` read from disk)."""
        return torch.is_tensor(self.train_x) and torch.is_tensor(self.test_x)

    @property
    def classes(self) -> list[str]:
        """Class names when the source has them, else the class indices as strings."""
        names = self.transform.get("classes")
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    # ----------------------------------------------------------------- methods
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch [B, C, H, W] as float32 model input: ``(x / 255 - mean) / std``.

        One fused multiply-add per element, on the batch's device; the statistics
        are read from ``transform`` on every call, so the record stays the truth.
        """
        if x.dtype != torch.uint8:
            raise DataError(
                f"normalize takes uint8 images (a slice of train_x/test_x), got {x.dtype}"
            )
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise DataError(
                f"normalize takes [B, {self.in_chans}, H, W] batches, got {tuple(x.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return torch.addcmul(-mean / std, x.to(torch.float32), 1.0 / (255.0 * std))

    def with_normalization(self, mean: list[float], std: list[float]) -> TaskData:
        """The same data normalised with other statistics (e.g. a source task's)."""
        record = dict(self.transform, mean=[float(m) for m in mean], std=[float(s) for s in std])
        return TaskData(
            self.name,
            self.num_classes,
            self.train_x,
            self.train_y,
            self.test_x,
            self.test_y,
            record,
        )

    def validate(self) -> None:
        """Raises DataError unless the task is usable: names, dtypes, shapes, labels, record."""
        if not isinstance(self.name, str) or not TASK_NAME.match(self.name):
            raise DataError(
                f"invalid task name {self.name!r}: use letters, digits, '_' and '-', "
                "starting with a letter or digit"
            )
        if len(self.name) > MAX_TASK_NAME:
            raise DataError(
                f"task name {self.name[:40]}... is {len(self.name)} characters long: at most "
                f"{MAX_TASK_NAME} fit in checkpoint file names; rename the dataset's file or "
                "folder (task names are derived from it), or pass a shorter name"
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise DataError(f"task {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if self.num_classes == 1:
            warnings.warn(
                f"task {self.name!r} has a single class: every prediction is right, so its "
                "accuracy is 1.0 by construction and its loss 0; give images of two classes "
                "or more (an image folder: one subfolder per class, train/CLASS/*.png)",
                UserWarning,
                stacklevel=2,
            )
        shape = None
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            images = torch.is_tensor(x) or isinstance(x, ImageFiles)
            if not images or x.dtype != torch.uint8 or x.ndim != 4:
                raise DataError(
                    f"task {self.name!r}: {split}_x must be a uint8 [N, C, H, W] tensor (or "
                    f"ImageFiles), got {_describe(x)}"
                )
            if not torch.is_tensor(y) or y.dtype != torch.int64 or y.ndim != 1:
                raise DataError(
                    f"task {self.name!r}: {split}_y must be an int64 [N] tensor, got {_describe(y)}"
                )
            if len(x) != len(y):
                raise DataError(
                    f"task {self.name!r}: {split}_x has {len(x)} images but {split}_y has "
                    f"{len(y)} labels: give one label per image"
                )
            if len(x) == 0:
                raise DataError(
                    f"task {self.name!r}: the {split} split is empty: give at least one "
                    f"{split} image"
                )
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise DataError(
                    f"task {self.name!r}: {split} labels span {low}..{high}, outside "
                    f"0..{self.num_classes - 1}: labels must be class indices 0..num_classes-1"
                )
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise DataError(
                    f"task {self.name!r}: train images are {list(shape)} but test images are "
                    f"{list(x.shape[1:])}: both splits must be at the same size"
                )
            shape = tuple(x.shape[1:])
        for key in ("mean", "std"):
            values = self.transform.get(key)
            if not isinstance(values, (list, tuple)) or len(values) != self.in_chans:
                raise DataError(
                    f"task {self.name!r}: transform[{key!r}] must list {self.in_chans} "
                    f"per-channel values, got {values!r}"
                )
        if any(float(s) <= 0 for s in self.transform["std"]):
            raise DataError(f"task {self.name!r}: transform['std'] must be positive")
        try:
            json.dumps(self.transform)
        except (TypeError, ValueError) as error:
            raise DataError(
                f"task {self.name!r}: transform must be JSON-serialisable ({error}): "
                "store plain numbers, strings, lists and dicts"
            ) from None

    def __repr__(self) -> str:
        def dims(x: torch.Tensor) -> str:
            return "x".join(str(d) for d in x.shape)

        return (
            f"TaskData(name={self.name!r}, num_classes={self.num_classes}, "
            f"train={dims(self.train_x)}, test={dims(self.test_x)})"
        )


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
