"""Image files read on demand: a dataset too large to hold in memory, as an array.

``ImageFiles`` stands where a uint8 [N, C, H, W] tensor stands in a ``TaskData``
(``train_x``/``test_x``): indexing it decodes and converts just those images,
so every consumer of task data keeps working, and the training loop reads it
through a ``torch.utils.data.DataLoader`` with workers (``modnet.data.loader``).
An image is a whole file (an image folder) or a byte range of one (a member of
an uncompressed tar shard, ``modnet.data.shards``). Paths are kept in one numpy
bytes array (each distinct file once) and offsets in numpy integer arrays rather
than lists of Python objects, so forked loader workers do not copy them page by
page as reference counts change, and memory stays flat whatever the number of
images.
"""

from __future__ import annotations

import copy
import io
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
        files: Image paths, in dataset order; with ``ranges``, the file holding
            each image (e.g. its tar shard).
        img_size: Side of the square images returned.
        in_chans: Channels returned (1 or 3).
        resize: Interpolation mode when a file's size differs (see ``convert_images``).
        antialias: Low-pass filter when shrinking.
        ranges: ``(offsets, sizes)``, int64 arrays [N]: image ``i`` is ``sizes[i]``
            bytes at byte ``offsets[i]`` of ``files[i]``. None: each file is one image.

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
        ranges: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        if not (isinstance(files, np.ndarray) and files.dtype.kind == "S"):
            files = np.array([os.fsencode(str(f)) for f in files], dtype=np.bytes_)
        # Each distinct file once, and every image's index among them.
        self._paths, which = np.unique(files, return_inverse=True)
        self._which = which.astype(np.int64).reshape(-1)
        if ranges is not None:
            offsets, sizes = (np.asarray(r, dtype=np.int64) for r in ranges)
            if offsets.shape != (len(self._which),) or sizes.shape != offsets.shape:
                raise ValueError("ranges: one offset and one size per image")
            ranges = (offsets, sizes)
        self._ranges = ranges
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.resize = resize
        self.antialias = antialias

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.in_chans, self.img_size, self.img_size))

    def __len__(self) -> int:
        return len(self._which)

    def path(self, index: int) -> Path:
        """The file of image ``index`` (with byte ranges: the file holding it)."""
        return Path(os.fsdecode(self._paths[self._which[index]]))

    def key(self, index: int) -> tuple[str, int]:
        """Where image ``index`` is: ``(file, byte offset)``, the same for the same image."""
        offset = 0 if self._ranges is None else int(self._ranges[0][index])
        return str(self.path(index)), offset

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as stored: uint8 [C, H, W] at the file's own size and channels."""
        if self._ranges is None:
            return decode(self.path(index))
        path = self.path(index)
        offset, size = int(self._ranges[0][index]), int(self._ranges[1][index])
        try:
            with open(path, "rb") as file:
                file.seek(offset)
                data = file.read(size)
        except OSError as error:
            raise DataError(f"cannot read {path} ({error}): check that the file is there") from None
        if len(data) != size:
            raise DataError(
                f"{path} ends before byte {offset + size}: the file changed since it was listed "
                "(load the dataset again)"
            )
        try:
            return decode(io.BytesIO(data))
        except DataError:
            raise DataError(
                f"cannot read the image {member_at(path, offset)} of {path} (not a readable "
                "image): replace that sample in its shard"
            ) from None

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` decoded and converted: uint8 [C, H, W]."""
        image = self.decode(index)
        return convert_images([image], self.img_size, self.in_chans, self.resize, self.antialias)[0]

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageFiles:
        """The images at ``index``, still on disk."""
        index = np.asarray(torch.as_tensor(index), dtype=np.int64).reshape(-1)
        picked = copy.copy(self)
        picked._which = self._which[index]
        picked._ranges = None if self._ranges is None else tuple(r[index] for r in self._ranges)
        return picked

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


def member_at(path: Path, offset: int) -> str:
    """The name of the tar member whose data start at byte ``offset`` (for error messages)."""
    import tarfile

    try:
        with tarfile.open(path, mode="r:") as tar:
            return next(m.name for m in tar if m.offset_data == offset)
    except (OSError, StopIteration, tarfile.TarError):
        return f"at byte {offset}"


def decode(source: str | Path | io.BytesIO) -> torch.Tensor:
    """One image (a file, or its bytes) as a uint8 [C, H, W] tensor (PIL decodes it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            return image_to_tensor(image)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise DataError(
            f"cannot read the image {source} ({error}): delete or replace the file"
        ) from None
