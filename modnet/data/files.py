"""Image files read on demand: a dataset too large to hold in memory, as an array.

``ImageFiles`` stands where a uint8 [N, C, H, W] tensor stands in a ``TaskData``
(``train_x``/``test_x``): indexing it decodes and converts just those images,
so every consumer of task data keeps working, and the training loop reads it
through a ``torch.utils.data.DataLoader`` with workers (``modnet.data.loader``).
Paths are kept in one numpy bytes array rather than a list of Python strings,
so forked loader workers do not copy them page by page as reference counts
change, and memory stays flat whatever the number of images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .transform import convert_images, image_to_tensor


class ImageFiles:
    """Images decoded from files when indexed, at a fixed size and channel count.

    Args:
        files: Image paths, in dataset order.
        img_size: Side of the square images returned.
        in_chans: Channels returned (1 or 3).
        resize: Interpolation mode when a file's size differs (see ``convert_images``).
        antialias: Low-pass filter when shrinking.

    Indexing with an integer returns a uint8 [C, H, W] tensor; with a slice, a
    list or an integer tensor, a uint8 [n, C, H, W] tensor, like a tensor would.
    Raises ``DataError`` naming the file when one cannot be read.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(
        self,
        files: Sequence[str | Path] | np.ndarray,
        img_size: int,
        in_chans: int,
        resize: str = "bilinear",
        antialias: bool = True,
    ):
        if isinstance(files, np.ndarray) and files.dtype.kind == "S":
            self._paths = files
        else:
            self._paths = np.array([os.fsencode(str(f)) for f in files], dtype=np.bytes_)
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.resize = resize
        self.antialias = antialias

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.in_chans, self.img_size, self.img_size))

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        """The file of image ``index``."""
        return Path(os.fsdecode(self._paths[index]))

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded and converted: uint8 [C, H, W]."""
        image = decode(self.path(index))
        return convert_images([image], self.img_size, self.in_chans, self.resize, self.antialias)[0]

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageFiles:
        """The images at ``index``, still on disk."""
        picked = self._paths[np.asarray(torch.as_tensor(index), dtype=np.int64)]
        return ImageFiles(picked, self.img_size, self.in_chans, self.resize, self.antialias)

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            return self.load(int(index))
        if isinstance(index, slice):
            positions = range(len(self))[index]
        else:
            positions = torch.as_tensor(index).reshape(-1).tolist()
        size = (len(positions), self.in_chans, self.img_size, self.img_size)
        out = torch.empty(size, dtype=torch.uint8)
        for row, position in enumerate(positions):
            out[row] = self.load(position)
        return out

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive batches of at most ``size`` images, like ``Tensor.split``."""
        for start in range(0, len(self), size):
            yield self[start : start + size]

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files at {self.in_chans}x{self.img_size}x{self.img_size})"


def decode(path: str | Path) -> torch.Tensor:
    """One image file as a uint8 [C, H, W] tensor (PIL decodes it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image_to_tensor(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(
            f"cannot read the image {path} ({error}): delete or replace the file"
        ) from None
