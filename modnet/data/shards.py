"""``shards:DIR``: WebDataset tar shards, read in place by byte range.

A sharded dataset keeps many images in few files: copying, listing and opening
a million images costs a million file operations, a few hundred shards do not.
The layout is WebDataset's (https://github.com/webdataset/webdataset): each
shard is a plain ``.tar`` whose members are grouped into samples by key, the
member's path up to the first dot of its file name; a sample here is an image
(``KEY.jpg``, ``.png``, ... any of ``IMAGE_EXTENSIONS``) and its class index as
decimal text (``KEY.cls``, or ``.class``, ``.cls.txt``), which is what
``webdataset.TarWriter`` writes for ``{"__key__": key, "png": image, "cls": 3}``.
Other members (``.json``, ``.txt``) are ignored. Shards are found as

- ``DIR/train/*.tar`` and ``DIR/test/*.tar`` (or ``val/``, ``validation/``), or
- ``DIR/*.tar`` named with the split as a word: ``imagenet-train-000000.tar``,
  ``imagenet-val-000000.tar``; the last split word of a name counts, so
  ``test-set-train-0.tar`` is a training shard;

where test shards, when there are any, are the test split, else val's, else
validation's (the others are not read); a shard that belongs to no split is refused;

and an optional ``DIR/classes.txt`` names the classes, one per line in class
order (without it the number of classes is the largest label + 1). Every test
class needs training samples.

Each shard's member headers are read once (Python's ``tarfile``; the images
are skipped, not read) into an index of byte ranges, and images are decoded
from their ranges when used (``ImageFiles``). So the data are random-access
like an image folder: the sample order stays a pure function of the step
(exact resume, ranks without overlap), which a streaming reader cannot give.
Compressed shards (``.tar.gz``) cannot be read by byte range and are refused,
as are shards that end mid-archive (an interrupted copy).
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
LABEL_SUFFIXES = frozenset({"cls", "class", "cls.txt"})
SPLITS = {"train": ("train",), "test": ("test", "val", "validation")}
SPLIT_WORDS = {word: split for split, words in SPLITS.items() for word in words}
COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")
# Leading bytes of compressed files: gzip, bzip2, xz, zstd.
MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
BLOCK = tarfile.BLOCKSIZE


def split_word(name: str) -> str | None:
    """The last split word (``train``, ``test``, ``val``, ``validation``) of a file name."""
    words = [w for w in re.split(r"[^a-z]+", name.lower()) if w in SPLIT_WORDS]
    return words[-1] if words else None


def find_shards(root: Path) -> tuple[dict[str, list[Path]], str]:
    """The shards of each split (sorted) and the test split's folder or word.

    Raises:
        DataError: No folder at ``root``, a split without shards, or compressed
            shards among them.
    """
    layout = (
        f"expected {root}/train/*.tar and {root}/test/*.tar (or val/, validation/), or "
        f"shards named like {root}/NAME-train-000000.tar and NAME-test-000000.tar (or -val-)"
    )
    if not root.is_dir():
        raise DataError(
            f"no folder at {root}: check the path (a relative path, as recorded by a run, is "
            f"read from the current folder, then from --data-root); {layout}"
        )
    folders = [w for w in SPLIT_WORDS if (root / w).is_dir()]
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_shard(p))
    if folders:
        if loose:
            raise DataError(
                f"{root} holds split folders ({', '.join(folders)}) and also the shards "
                f"{', '.join(p.name for p in loose[:3])}: move those into a split folder"
            )
        by_word = {w: sorted(p for p in (root / w).iterdir() if p.is_file()) for w in folders}
    else:
        unnamed = [p.name for p in loose if split_word(p.name) is None]
        if unnamed:
            raise DataError(
                f"{', '.join(unnamed[:3])} in {root} "
                f"{'names' if len(unnamed) == 1 else 'name'} no split: name shards "
                "NAME-train-000000.tar and NAME-test-000000.tar (or -val-), or put them in "
                "train/ and test/ folders"
            )
        by_word = {}
        for path in loose:
            by_word.setdefault(split_word(path.name), []).append(path)
    found: dict[str, list[Path]] = {}
    names: dict[str, str] = {}
    for split, words in SPLITS.items():
        # the first of the split's words that has shards: test before val, as with folders
        word = next((w for w in words if by_word.get(w)), words[0])
        candidates = by_word.get(word, [])
        names[split] = word
        packed = [p for p in candidates if p.name.lower().endswith(COMPRESSED)]
        if packed:
            raise DataError(
                f"{', '.join(str(p.relative_to(root)) for p in packed[:3])} in {root} "
                f"{'is' if len(packed) == 1 else 'are'} compressed: decompress every shard "
                "(images in compressed shards cannot be read by byte range, and JPEG/PNG "
                "images are compressed already)"
            )
        found[split] = [p for p in candidates if p.suffix.lower() == ".tar"]
        if not found[split]:
            raise DataError(f"{root} has no {split} shards: {layout}")
    return found, names["test"]


def _is_shard(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".tar") or name.endswith(COMPRESSED)


def index_shard(path: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Every sample of one shard, in its order: image offsets, sizes (bytes) and labels.

    Raises:
        DataError: Not a tar, compressed, or ending mid-archive; a sample without an
            image or a label, with two images, or with a label that is not an integer.
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
                            "write each label as its class index 0..K-1 (the class names go "
                            "in classes.txt beside the shards, one per line)"
                        ) from None
            end = tar.offset  # where reading stopped: the end-of-archive block, if complete
    except (tarfile.ReadError, EOFError) as error:
        with open(path, "rb") as file:
            compressed = file.read(6).startswith(MAGIC)
        fix = (
            "it is compressed: decompress it (compressed shards cannot be read by byte range)"
            if compressed
            else "it is damaged or incomplete: copy or write it again"
        )
        raise DataError(f"cannot read {path} as a tar ({error}): {fix}") from None
    _check_complete(path, end, images)
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


def _check_complete(path: Path, end: int, images: dict[str, tuple[int, int]]) -> None:
    """Refuses a shard whose listing stopped before its end-of-archive block.

    Python's ``tarfile`` stops listing silently at a truncated or damaged header,
    so a shard cut short by an interrupted copy would lose samples unnoticed.
    """
    size = path.stat().st_size
    last = max((offset + length for offset, length in images.values()), default=0)
    with open(path, "rb") as file:
        file.seek(end)
        block = file.read(BLOCK)
    if last > size or len(block) < BLOCK or block.count(0) != BLOCK:
        raise DataError(
            f"{path} ends mid-archive (no end-of-archive block after byte {min(end, size)} of "
            f"{size}): the shard is incomplete or damaged; copy or write it again"
        )


def _split(shards: list[Path], options: LoadOptions) -> tuple[ImageFiles, torch.Tensor]:
    offsets, sizes, labels, counts = [], [], [], []
    for shard in shards:
        o, s, y = index_shard(shard)
        offsets.append(o)
        sizes.append(s)
        labels += y
        counts.append(len(y))
    if not labels:
        raise DataError(
            f"{shards[0].parent}: no sample in {len(shards)} shard(s) like {shards[0].name}: a "
            "sample is an image KEY.png (.jpg, ...) and its label KEY.cls, the key being the "
            "member's name up to the first dot of its file name"
        )
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
