"""How a dataset is brought to a model: one frozen record passed to every loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest")
CHANNELS = (1, 3)
IN_MEMORY_MB = 1024.0


@dataclass(frozen=True)
class LoadOptions:
    """Everything a loader needs besides the spec; built by ``load_task``.

    A single object rather than loose keyword arguments, so that options added
    later do not break user loaders registered with ``register_dataset``.

    Attributes:
        img_size: Side of the square images the model takes.
        in_chans: Channels the model takes (1 or 3).
        root: Folder holding downloaded datasets, or None.
        download: Let torchvision fetch missing files into ``root``.
        train_limit: Keep at most this many training images (seeded, class balanced).
        test_limit: Keep at most this many test images.
        seed: Seed of the subsets and of synthetic data.
        resize: ``torch.nn.functional.interpolate`` mode used when sizes differ.
        in_memory_mb: Image folders and shards whose converted images (train and test
            splits, uint8 at the model's size) take at most this many MiB are
            decoded once and held in memory; larger ones stay on disk and are
            decoded on demand (``modnet.data.ImageFiles``). None: always in memory.
    """

    img_size: int = 32
    in_chans: int = 3
    root: Path | None = None
    download: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    seed: int = 0
    resize: str = "bilinear"
    in_memory_mb: float | None = IN_MEMORY_MB

    def __post_init__(self) -> None:
        if not isinstance(self.img_size, int) or self.img_size < 1:
            raise DataError(f"img_size must be a positive integer, got {self.img_size!r}")
        if self.in_chans not in CHANNELS:
            raise DataError(
                f"in_chans must be 1 (grayscale) or 3 (RGB), got {self.in_chans!r}: "
                "build the model with in_chans=1 or 3"
            )
        for key in ("train_limit", "test_limit"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise DataError(
                    f"{key} must be a positive integer or None (no limit), got {value!r}"
                )
        if self.in_memory_mb is not None and not self.in_memory_mb >= 0:
            raise DataError(
                f"in_memory_mb must be a size in MiB (>= 0) or None, got {self.in_memory_mb!r}"
            )
        if self.resize not in RESIZE_MODES:
            raise DataError(f"unknown resize mode {self.resize!r}: choose one of {RESIZE_MODES}")
