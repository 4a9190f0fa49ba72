"""Datasets as tasks: every source becomes uint8 tensors at the model's size, once.

``load_task(spec)`` reads a dataset (torchvision sets from a data root, npz
archives, image folders, WebDataset tar shards, or the built-in synthetic
suite) and returns a ``TaskData``: train/test images as uint8 [N, C, H, W] at the model's image size
and channels, int64 labels, and a JSON record of the preprocessing that
``apply_transform`` repeats on new images. Batches become model input with
``TaskData.normalize``.
"""

from . import corruptions  # noqa: F401  (registers mnist-shot_noise, mnist-shear, ...)
from .arrays import load_folder, load_npz
from .augment import build_augmentation, policy_for
from .build import task_from_arrays
from .errors import DataError
from .files import ImageFiles
from .loader import TrainBatches, eval_batches
from .options import LoadOptions
from .registry import (
    data_root,
    list_datasets,
    load_task,
    portable_spec,
    register_dataset,
    unregister_dataset,
)
from .shards import load_shards
from .subset import balanced_indices
from .synthetic import (
    HELD_OUT_PAIRS,
    SYNTHETIC_DEFAULT_TASKS,
    make_synthetic,
    parse_synthetic_spec,
)
from .task_data import TaskData, valid_task_name
from .transform import apply_transform, channel_stats, convert_images

__all__ = [
    "HELD_OUT_PAIRS",
    "SYNTHETIC_DEFAULT_TASKS",
    "DataError",
    "ImageFiles",
    "LoadOptions",
    "TaskData",
    "TrainBatches",
    "apply_transform",
    "balanced_indices",
    "build_augmentation",
    "channel_stats",
    "convert_images",
    "data_root",
    "eval_batches",
    "list_datasets",
    "load_folder",
    "load_shards",
    "load_npz",
    "load_task",
    "portable_spec",
    "make_synthetic",
    "parse_synthetic_spec",
    "policy_for",
    "register_dataset",
    "task_from_arrays",
    "unregister_dataset",
    "valid_task_name",
]
