"""``shards:DIR``: WebDataset tar shards, read in place by byte range.

A sharded dataset keeps many images in few files: copying, listing and opening
a million images costs a million file operations, a few hundred shards do not.
The layout is WebDataset's (https://github.com/webdataset/webdataset): each
shard is a plain ``.tar`` whose members are grouped into samples by key, the
member's path up to the first dot of its file name; a sample here is an image
(``KEY.jpg``, ``.png``, ... any of ``IMAGE_EXTENSIONS``) and its class index as
text (``KEY.cls``). Other members (``.json``, ``.txt``) are ignored. Shards are
found as

- ``DIR/train/*.tar`` and ``DIR/test/*.tar`` (or ``DIR/val/*.tar``), or
- ``DIR/*.tar`` whose names hold the split as a word: ``imagenet-train-000000.tar``,
  ``imagenet-val-000000.tar``;

and an optional ``DIR/classes.txt`` names the classes, one per line in class
order (without it the number of classes is the largest label + 1).

Each shard's member headers are read once (Python's ``tarfile``; the images
are skipped, not read) into an index of byte ranges, and images are decoded
from their ranges when used (``ImageFiles``). So the data are random-access
like an image folder: the sample order stays a pure function of the step
(exact resume, ranks without overlap), which a streaming reader cannot give.
Compressed shards (``.tar.gz``) cannot be read by byte range and are refused.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from .arrays import IMAGE_EXTENSIONS, load_images
from .errors import DataError
from .files import ImageFiles
from .options import LoadOptions
from .task_data import TaskData, valid_task_name

IMAGE_SUFFIXES = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)
LABEL_SUFFIXES = frozenset({"cls", "cls.txt"})
SPLITS = {"train": ("train",), "test": ("test", "val")}


def find_shards(root: Path) -> tuple[dict[str, list[Path]], str]:
    """The shards of each split (sorted) and the name of the test split's folder or word.

    Raises:
        DataError: No folder at ``root``, or a split without shards.
    """
    layout = (
        f"expected {root}/train/*.tar and {root}/test/*.tar (or val/), or shards named "
        f"like {root}/NAME-train-000000.tar and NAME-test-000000.tar (or -val-)"
    )
    if not root.is_dir():
        raise DataError(f"no folder at {root}: check the path; {layout}")
    found: dict[str, list[Path]] = {}
    test_name = "test"
    for split, names in SPLITS.items():
        for name in names:
            if (root / name).is_dir():
                shards = sorted((root / name).glob("*.tar"))
            else:
                shards = sorted(
                    p for p in root.glob("*.tar") if name in re.split(r"[-_.]", p.stem.lower())
                )
            if shards:
                found[split] = shards
                test_name = name if split == "test" else test_name
                break
    compressed = sorted(p.name for p in root.rglob("*.tar.*"))[:3]
    for split in SPLITS:
        if split not in found:
            hint = (
                f" ({', '.join(compressed)} are compressed: decompress them, as images in "
                "compressed shards cannot be read by byte range)"
                if compressed
                else ""
            )
            raise DataError(f"{root} has no {split} shards{hint}: {layout}")
    return found, test_name


def index_shard(path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Every sample of one shard, in its order: image offsets, sizes (bytes) and labels.

    Raises:
        DataError: Not an uncompressed tar; a sample without an image or a label,
            with two images, or with a label that is not an integer.
    """
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, file_name = member.name.rpartition("/")
                stem, dot, suffix = file_name.partition(".")
                if not dot or not stem:  # no suffix, or a hidden file such as ._x.jpg
                    continue
                key, suffix = f"{folder}/{stem}" if folder else stem, suffix.lower()
                if suffix in IMAGE_SUFFIXES:
                    if key in images:
                        raise DataError(
                            f"{path}: sample {key!r} has two images: keep one image per key"
                        )
                    images[key] = (member.offset_data, member.size)
                elif suffix in LABEL_SUFFIXES:
                    text = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise DataError(
                            f"{path}: {member.name} holds {text[:20]!r}, not a class index: "
                            "write each label as an integer 0..num_classes-1"
                        ) from None
    except (tarfile.ReadError, EOFError) as error:
        raise DataError(
            f"cannot read {path} as an uncompressed tar ({error}): shards must be plain .tar "
            "files (compressed ones cannot be read by byte range; decompress them)"
        ) from None
    unlabelled = [k for k in images if k not in labels]
    if unlabelled:
        raise DataError(
            f"{path}: sample {unlabelled[0]!r} (and {len(unlabelled) - 1} more) has no label: "
            "every sample needs a KEY.cls member holding its class index"
        )
    missing = [k for k in labels if k not in images]
    if missing:
        raise DataError(
            f"{path}: sample {missing[0]!r} (and {len(missing) - 1} more) has a label but no "
            f"image ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    ranges = np.array(list(images.values()), dtype=np.int64).reshape(-1, 2)
    return ranges[:, 0], ranges[:, 1], [labels[k] for k in images]


def _split(shards: list[Path], options: LoadOptions) -> tuple[ImageFiles, torch.Tensor]:
    offsets, sizes, labels, counts = [], [], [], []
    for shard in shards:
        o, s, y = index_shard(shard)
        offsets.append(o)
        sizes.append(s)
        labels += y
        counts.append(len(y))
    paths = np.array([os.fsencode(str(s)) for s in shards], dtype=np.bytes_)
    files = ImageFiles(
        np.repeat(paths, counts),
        options.img_size,
        options.in_chans,
        options.resize,
        ranges=(np.concatenate(offsets), np.concatenate(sizes)),
    )
    return files, torch.tensor(labels, dtype=torch.int64)


def load_shards(path: str | Path, options: LoadOptions, *, name: str | None = None) -> TaskData:
    """Loads a dataset of WebDataset tar shards (layout in the module docstring).

    The images are read as ``load_images`` says: decoded only where used, and
    left in their shards (decoded on demand) when the chosen images would take
    more than ``options.in_memory_mb`` at the model's size.

    Args:
        path: The folder of shards.
        options: Size, channels, limits, seed and the in-memory threshold.
        name: Task name; default: the folder's name made valid.

    Raises:
        DataError: A missing split, an unreadable shard, a sample without image or
            label, labels outside ``classes.txt``'s classes.
    """
    root = Path(path)
    shards, test_name = find_shards(root)
    classes = None
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    train, test = _split(shards["train"], options), _split(shards["test"], options)
    return load_images(
        name or valid_task_name(root.name),
        train,
        test,
        options,
        source={
            "dataset": "shards",
            "path": str(root),
            "test_split": test_name,
            "shards": {split: len(files) for split, files in shards.items()},
        },
        classes=classes,
    )
