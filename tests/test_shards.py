"""WebDataset tar shards (``shards:DIR``): the same images as an image folder, read in place."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from modnet.data import DataError, ImageFiles, load_task
from modnet.train import train
from tests.test_loader import _config, peak_rss, write_tiny_folder


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shard_folder(folder: Path, out: Path, per_shard: int = 25, named: bool = False) -> Path:
    """The images of an image folder as WebDataset shards, in the folder loader's order.

    ``named``: shards named ``data-<split>-NNNNNN.tar`` in ``out`` instead of ``out/<split>/``.
    """
    for split in ("train", "test"):
        classes = sorted(p.name for p in (folder / split).iterdir())
        samples = [
            (c, path)
            for c, name in enumerate(classes)
            for path in sorted((folder / split / name).iterdir())
        ]
        target = out if named else out / split
        target.mkdir(parents=True, exist_ok=True)
        for number, start in enumerate(range(0, len(samples), per_shard)):
            stem = f"data-{split}-{number:06d}" if named else f"{number:06d}"
            with tarfile.open(target / f"{stem}.tar", "w") as tar:
                for c, path in samples[start : start + per_shard]:
                    key = f"{split}/{path.stem}"
                    add(tar, f"{key}.png", path.read_bytes())
                    add(tar, f"{key}.cls", str(c).encode())
                    add(tar, f"{key}.json", b"{}")  # other members are ignored
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[Path, Path]:
    """The same 60 + 20 images as ``a/data`` (a folder) and ``b/data`` (shards of 25)."""
    root = tmp_path_factory.mktemp("same")
    folder = write_tiny_folder(root / "a" / "data", train=60, test=20)
    return folder, shard_folder(folder, root / "b" / "data")


def load(spec: str, on_disk: bool, **options):
    return load_task(spec, img_size=8, in_memory_mb=0 if on_disk else None, **options)


@pytest.mark.parametrize("on_disk", [False, True])
def test_shards_read_the_pixels_and_labels_of_the_same_folder(both, on_disk):
    folder, shards = both
    a, b = load(f"folder:{folder}", on_disk), load(f"shards:{shards}", on_disk)
    assert a.name == b.name == "data" and b.num_classes == 4
    assert isinstance(b.train_x, ImageFiles) == on_disk == (not b.in_memory)
    assert torch.equal(b.train_x[torch.arange(60)], a.train_x[torch.arange(60)])
    assert torch.equal(b.test_x[torch.arange(20)], a.test_x[torch.arange(20)])
    assert torch.equal(b.train_y, a.train_y) and torch.equal(b.test_y, a.test_y)
    assert b.mean == a.mean and b.std == a.std
    assert b.transform["source"]["dataset"] == "shards"
    assert b.transform["source"]["shards"] == {"train": 3, "test": 1}
    # a seeded, class-balanced subset picks the same images
    a, b = (
        load(f"folder:{folder}", on_disk, train_limit=12),
        load(f"shards:{shards}", on_disk, train_limit=12),
    )
    assert torch.equal(b.train_x[torch.arange(12)], a.train_x[torch.arange(12)])
    assert torch.equal(b.train_y, a.train_y)


def test_named_shards_in_one_folder_with_a_val_split_and_class_names(both, tmp_path):
    """The last split word of a name counts: a dataset named "test-set" keeps its splits."""
    folder, shards = both
    named = shard_folder(folder, tmp_path / "named", per_shard=7, named=True)
    for path in named.glob("data-*.tar"):
        renamed = path.name.replace("data-", "test-set-").replace("-test-", "-validation-")
        path.rename(path.with_name(renamed))
    (named / "classes.txt").write_text("zero\none\ntwo\nthree\n")
    a, b = load(f"shards:{shards}", False), load(f"shards:{named}", False, augment=True)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert b.transform["classes"] == ["zero", "one", "two", "three"]
    assert b.transform["source"]["test_split"] == "validation"
    assert b.transform["source"]["shards"] == {"train": 9, "test": 3}
    assert b.transform["augment"]["policy"] == "crop_flip"


def test_flat_shards_pick_one_test_split_and_refuse_shards_of_no_split(both, tmp_path):
    folder, shards = both
    flat = shard_folder(folder, tmp_path / "flat", per_shard=7, named=True)
    for path in flat.glob("data-test-*.tar"):  # a validation split beside the test split
        shutil.copy(path, path.with_name(path.name.replace("-test-", "-val-")))
    task = load(f"shards:{flat}", False)
    assert len(task.test_y) == 20 and task.transform["source"]["test_split"] == "test"
    (flat / "extra-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="extra-000000.tar in .* names no split"):
        load(f"shards:{flat}", False)
    (flat / "more-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match="extra-000000.tar, more-000000.tar in .* name no split"):
        load(f"shards:{flat}", False)
    (flat / "more-000000.tar").unlink()
    folders = shutil.copytree(shards, tmp_path / "folders")
    (flat / "extra-000000.tar").rename(folders / "loose-train-000000.tar")
    with pytest.raises(DataError, match=r"holds split folders \(train, test\) and also the "):
        load(f"shards:{folders}", False)


def _one_shard(root: Path, members: dict[str, bytes]) -> Path:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
        with tarfile.open(root / split / "000000.tar", "w") as tar:
            for name, data in members.items():
                add(tar, name, data)
    return root


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "members, message",
    [
        ({"a.png": b"", "a.cls": b"0", "b.png": b""}, r"sample 'b' \(and 0 more\) has no label"),
        ({"a.png": b"", "a.cls": b"cat"}, r"holds 'cat', not a class index: .*classes.txt"),
        ({"a.png": b"", "a.jpg": b"", "a.cls": b"0"}, "sample 'a' has two images"),
        ({"a.cls": b"0"}, "sample 'a' .* has a label but no image"),
        ({"a.b.png": b"", "a.b.cls": b"0"}, "no sample in 1 shard.* up to the first dot"),
    ],
)
def test_a_malformed_shard_is_named_with_the_fix(tmp_path, members, message):
    root = _one_shard(tmp_path / "bad", members)
    with pytest.raises(DataError, match=message):
        load(f"shards:{root}", False)


def test_compressed_incomplete_or_missing_shards_are_refused_before_any_work(tmp_path):
    root = _one_shard(tmp_path / "gz", {"a.png": _png(), "a.cls": b"0"})
    packed = root / "train" / "000000.tar"
    whole = packed.read_bytes()
    packed.write_bytes(gzip.compress(whole))
    with pytest.raises(DataError, match=r"cannot read .*000000.tar as a tar .* it is compressed"):
        load(f"shards:{root}", False)
    # a compressed shard beside plain ones is not skipped: it would lose its samples
    packed.rename(root / "train" / "000001.tar.gz")
    packed.write_bytes(whole)
    for name in ("000001.tar.gz", "000001.tgz"):
        with pytest.raises(DataError, match=f"train/{name} in .* is compressed: decompress"):
            load(f"shards:{root}", False)
        (root / "train" / name).rename(root / "train" / "000001.tgz")
    (root / "train" / "000001.tgz").unlink()
    # an interrupted copy: cut in the end-of-archive blocks, in a header, in an image
    for cut in (len(whole) - 10_000, 1536 + 100, 600):
        packed.write_bytes(whole[:cut])
        with pytest.raises(DataError, match="incomplete or damaged|damaged or incomplete"):
            load(f"shards:{root}", False)
    shutil.rmtree(root / "train")
    with pytest.raises(DataError, match=r"no train shards: expected .*/train/\*.tar"):
        load(f"shards:{root}", False)
    with pytest.raises(DataError, match="no folder at"):
        load(f"shards:{tmp_path / 'absent'}", False)


def test_an_image_that_cannot_be_decoded_is_named_by_member_and_shard(tmp_path):
    root = _one_shard(tmp_path / "data", {"a.png": _png(), "a.cls": b"0"})
    with tarfile.open(root / "test" / "000000.tar", "w") as tar:
        add(tar, "b.png", b"garbage")
        add(tar, "b.cls", b"0")
    task = load(f"shards:{root}", True)  # on disk: nothing of the test split decoded yet
    with pytest.raises(DataError, match=r"cannot read the image b.png of .*000000.tar .*its shard"):
        task.test_x[0]


def test_labels_beyond_the_named_classes_or_only_in_the_test_split_are_refused(tmp_path):
    root = _one_shard(tmp_path / "data", {"a.png": _png(), "a.class": b"3"})
    (root / "classes.txt").write_text("zero\none\n")
    with pytest.raises(DataError, match=r"labels span 3..3, outside 0..1"):
        load(f"shards:{root}", False)
    members = {"a.png": _png(), "a.class": b"0", "c.png": _png(), "c.class": b"1"}
    root = _one_shard(tmp_path / "zero", members)
    with tarfile.open(root / "test" / "000000.tar", "w") as tar:
        add(tar, "b.png", _png())
        add(tar, "b.cls", b"2")
    with pytest.raises(DataError, match=r"test split has class 2 that no training sample"):
        load(f"shards:{root}", False)


def test_training_from_shards_on_disk_equals_training_from_the_folder(both, tmp_path):
    """Same images, same order: the same weights, bit for bit, through a loader worker."""
    folder, shards = both
    from_folder = train(_config(tasks=[f"folder:{folder}"], epochs=1), tmp_path / "folder")
    from_shards = train(_config(tasks=[f"shards:{shards}"], epochs=1), tmp_path / "shards")
    expected = from_folder.model.state_dict()
    for name, value in from_shards.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert from_shards.accuracy == from_folder.accuracy


def write_tiny_shards(root: Path, train: int, test: int, per_shard: int = 1000) -> Path:
    """``train``/``test`` random 8x8 PNGs in 4 classes, written straight into shards."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True)
        pixels = generator.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
        for number, start in enumerate(range(0, count, per_shard)):
            with tarfile.open(root / split / f"{number:06d}.tar", "w") as tar:
                for i in range(start, min(start + per_shard, count)):
                    buffer = io.BytesIO()
                    Image.fromarray(pixels[i]).save(buffer, format="PNG")
                    add(tar, f"{i:06d}.png", buffer.getvalue())
                    add(tar, f"{i:06d}.cls", str(i % 4).encode())
    return root


READ_ALL = """
import dataclasses, json, resource, sys
from modnet.data import eval_batches, load_task
task = load_task("shards:" + sys.argv[1], img_size=8, in_memory_mb=0)
every = dataclasses.replace(task, test_x=task.train_x, test_y=task.train_y)  # read the train split
seen = sum(len(y) for _, y in eval_batches(every, 64, workers=1))
assert seen == len(task.train_y) >= 1000
"""


@pytest.mark.slow
def test_peak_memory_reading_shards_does_not_grow_with_the_number_of_images(tmp_path):
    """Index and read every image of 1,000 and of 10,000: the same peak RSS within 10 %."""
    counts = (1_000, 10_000)
    runs = [[str(write_tiny_shards(tmp_path / f"n{n}", train=n, test=64))] for n in counts]
    peaks = dict(zip(counts, peak_rss(READ_ALL, *runs), strict=True))
    print(f"peak RSS in KiB (own process, largest loader worker): {peaks}")
    for side in ("own", "workers"):
        assert peaks[10_000][side] <= 1.1 * peaks[1_000][side], (side, peaks)
