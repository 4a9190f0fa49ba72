"""The data layer: loaders on small fake files in the real formats, conversion, subsets, errors."""

from __future__ import annotations

import bz2
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modnet.data import (
    DataError,
    LoadOptions,
    TaskData,
    apply_transform,
    balanced_indices,
    convert_images,
    data_root,
    list_datasets,
    load_task,
    register_dataset,
    task_from_arrays,
    unregister_dataset,
)

# --------------------------------------------------------------------- fake files


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX (ubyte) file as MNIST ships: magic 0x0803/0x0801, big-endian dims, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, folder: str = "MNIST", train: int = 30, test: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", train), ("t10k", test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", x)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y)
        arrays[prefix] = (x, y)
    return arrays


def write_usps(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """USPS as libsvm lines in bz2: 'label idx:value ...', labels 1..10, values in [-1, 1]."""
    lines = []
    for image, label in zip(images, labels, strict=True):
        values = image.reshape(-1) / 255.0 * 2 - 1
        pixels = " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(values))
        lines.append(f"{label + 1} {pixels}\n")
    path.write_bytes(bz2.compress("".join(lines).encode()))


def fake_arrays(train=40, test=20, size=20, channels=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    shape = (size, size, channels) if channels else (size, size)
    return dict(
        train_x=rng.integers(0, 256, (train, *shape), dtype=np.uint8),
        train_y=np.arange(train) % classes,
        test_x=rng.integers(0, 256, (test, *shape), dtype=np.uint8),
        test_y=np.arange(test) % classes,
    )


def write_folder(root: Path, split: str, classes: dict[str, int], size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(len(split))
    for cls, count in classes.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / split / cls / f"{i:03d}.png")


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    """Tests never read a data root from the environment unless they set one."""
    monkeypatch.delenv("MODNET_DATA_ROOT", raising=False)


# ----------------------------------------------------------------------- loaders


def test_mnist_idx_files_load_at_model_size_with_gray_repeated(tmp_path):
    raw = fake_mnist(tmp_path)
    task = load_task("mnist", root=tmp_path, img_size=32, in_chans=3)
    assert task.name == "mnist" and task.num_classes == 10
    assert task.train_x.shape == (30, 3, 32, 32) and task.test_x.shape == (12, 3, 32, 32)
    assert torch.equal(task.train_x[:, 0], task.train_x[:, 2])  # gray repeated
    assert torch.equal(task.train_y, torch.arange(30) % 10)
    assert task.transform["channel_conversion"] == "repeat"
    assert task.transform["source_size"] == [28, 28] and task.transform["source_chans"] == 1
    native = load_task("mnist", root=tmp_path, img_size=28, in_chans=1)
    assert torch.equal(native.train_x[:, 0], torch.from_numpy(raw["train"][0]))
    assert torch.equal(native.test_y, torch.from_numpy(raw["t10k"][1]).long())


def test_fashion_mnist_and_kmnist_use_their_own_folders(tmp_path):
    fake_mnist(tmp_path, "FashionMNIST", seed=1)
    fake_mnist(tmp_path, "KMNIST", seed=2)
    fashion = load_task("fashion-mnist", root=tmp_path, img_size=28, in_chans=1)
    kmnist = load_task("kmnist", root=tmp_path, img_size=28, in_chans=1)
    assert fashion.name == "fashion_mnist" and kmnist.name == "kmnist"
    assert not torch.equal(fashion.train_x, kmnist.train_x)
    assert fashion.classes[0] == "T-shirt/top"


def test_usps_bz2_loads_with_labels_shifted_to_zero(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.choice([0, 255], size=(25, 16, 16)).astype(np.uint8)
    labels = np.arange(25) % 10
    write_usps(tmp_path / "usps.bz2", images, labels)
    write_usps(tmp_path / "usps.t.bz2", images[:7], labels[:7])
    task = load_task("usps", root=tmp_path, img_size=16, in_chans=1)
    assert task.train_x.shape == (25, 1, 16, 16) and task.test_x.shape == (7, 1, 16, 16)
    assert torch.equal(task.train_x[:, 0], torch.from_numpy(images))
    assert torch.equal(task.train_y, torch.from_numpy(labels))
    big = load_task("usps", root=tmp_path)
    assert big.train_x.shape == (25, 3, 32, 32)


def test_npz_by_path_names_the_task_after_the_file(tmp_path):
    arrays = fake_arrays(channels=3, size=32)
    np.savez(tmp_path / "my data.v2.npz", classes=np.array(["ant", "bee", "cow", "dog"]), **arrays)
    task = load_task(f"npz:{tmp_path / 'my data.v2.npz'}")
    assert task.name == "my_data_v2" and task.classes == ["ant", "bee", "cow", "dog"]
    assert torch.equal(task.train_x, torch.from_numpy(arrays["train_x"]).permute(0, 3, 1, 2))
    assert torch.equal(task.test_y, torch.from_numpy(arrays["test_y"]))
    assert task.transform["channel_conversion"] == "none"
    # a relative path is also looked up under the data root
    assert load_task("npz:my data.v2.npz", root=tmp_path).name == "my_data_v2"


def test_npz_test_classes_without_training_samples_are_refused(tmp_path):
    arrays = fake_arrays(channels=3, size=8)
    arrays["test_y"] = arrays["test_y"].copy()
    arrays["test_y"][3] = 4  # a fifth class only the test split has: it would grow the head
    np.savez(tmp_path / "unseen.npz", **arrays)
    with pytest.raises(DataError, match=r"unseen: the test split has class 4 that no training"):
        load_task(f"npz:{tmp_path / 'unseen.npz'}")
    # named classes are named; beyond five, the rest are counted
    arrays = fake_arrays(channels=3, size=8, classes=9)
    arrays["train_y"] = arrays["train_y"] % 2
    names = np.array([b"ant", b"bee", b"cow", b"dog", b"eel", b"fox", b"gnu", b"hen", b"ibis"])
    np.savez(tmp_path / "named.npz", classes=names, **arrays)
    with pytest.raises(DataError, match=r"classes 2 \(cow\), 3 \(dog\), .*6 \(gnu\) and 2 more"):
        load_task(f"npz:{tmp_path / 'named.npz'}")


def test_a_train_limit_below_the_class_count_warns_that_classes_go_unseen(tmp_path):
    np.savez(tmp_path / "four.npz", **fake_arrays(channels=3, size=8))
    write_folder(tmp_path / "pics", "train", {"ant": 2, "bee": 2, "cow": 2})
    write_folder(tmp_path / "pics", "test", {"ant": 1, "bee": 1, "cow": 1})
    for spec, held in ((f"npz:{tmp_path / 'four.npz'}", 4), (f"folder:{tmp_path / 'pics'}", 3)):
        name = "four" if held == 4 else "pics"
        message = (
            f"{name}: train_limit=2 keeps 2 of the {held} classes of the training split, so "
            f"the model never sees the others: raise it to at least {held}"
        )
        with pytest.warns(UserWarning) as record:
            task = load_task(spec, train_limit=2)
        assert [str(w.message) for w in record] == [message]
        assert len(task.train_y.unique()) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert len(load_task(spec, train_limit=held).train_y.unique()) == held


def test_npz_grayscale_hw_arrays_and_rgb_to_gray_luminance(tmp_path):
    gray = fake_arrays(channels=0, size=32)
    np.savez(tmp_path / "gray.npz", **gray)
    task = load_task(f"npz:{tmp_path / 'gray.npz'}", in_chans=3)
    assert task.train_x.shape == (40, 3, 32, 32)
    rgb = fake_arrays(channels=3, size=32)
    np.savez(tmp_path / "rgb.npz", **rgb)
    task = load_task(f"npz:{tmp_path / 'rgb.npz'}", in_chans=1)
    x = torch.from_numpy(rgb["train_x"]).float()
    luma = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).round()
    assert torch.equal(task.train_x[:, 0], luma.to(torch.uint8))
    assert task.transform["channel_conversion"] == "luminance"


def test_mnist_m_and_cifar10_npz_copies_in_the_root(tmp_path):
    np.savez(tmp_path / "mnist_m_subset.npz", **fake_arrays(classes=10, size=32))
    np.savez(tmp_path / "cifar10_subset.npz", **fake_arrays(classes=10, size=32, seed=1))
    mnist_m = load_task("mnist_m", root=tmp_path)
    cifar = load_task("cifar10", root=tmp_path)
    assert mnist_m.name == "mnist_m" and cifar.name == "cifar10"
    assert mnist_m.num_classes == 10 and cifar.train_x.shape == (40, 3, 32, 32)
    assert cifar.transform["source"]["dataset"] == "cifar10"
    assert cifar.transform["source"]["path"].endswith("cifar10_subset.npz")
    assert cifar.classes[:2] == ["airplane", "automobile"] and mnist_m.classes[9] == "9"


def test_image_folder_with_val_split_gray_pngs_and_varied_sizes(tmp_path):
    root = tmp_path / "pets"
    write_folder(root, "train", {"cat": 5, "dog": 3, "emu": 4})
    write_folder(root, "val", {"cat": 2, "dog": 2}, size=(9, 14))
    task = load_task(f"folder:{root}", img_size=16)
    assert task.name == "pets" and task.num_classes == 3
    assert task.classes == ["cat", "dog", "emu"]
    assert task.train_x.shape == (12, 3, 16, 16) and task.test_x.shape == (4, 3, 16, 16)
    assert torch.equal(task.train_y, torch.tensor([0] * 5 + [1] * 3 + [2] * 4))
    assert task.transform["source"]["test_folder"] == "val"
    assert task.transform["source_size"] is None  # the splits differ in size
    pixels = np.array(Image.open(root / "train" / "dog" / "001.png"))
    direct = convert_images(torch.from_numpy(pixels).permute(2, 0, 1)[None], 16, 3)
    assert torch.equal(task.train_x[6], direct[0])
    gray = tmp_path / "gray"
    write_folder(gray, "train", {"a": 2, "b": 2}, mode="L")
    write_folder(gray, "test", {"a": 1, "b": 1}, mode="L")
    task = load_task(f"folder:{gray}", img_size=10)
    assert task.transform["source_chans"] == 1
    assert torch.equal(task.train_x[:, 0], task.train_x[:, 1])


# -------------------------------------------------------------------- conversion


def test_resize_keeps_constant_images_and_shrinks_with_antialiasing():
    flat = torch.full((3, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(convert_images(flat, 32, 3), torch.full((3, 3, 32, 32), 77).byte())
    stripes = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    stripes[..., ::2] = 255  # one-pixel stripes: a low-pass average is mid grey
    small = convert_images(stripes, 16, 1).float()[..., 1:-1]  # borders see one side only
    assert (small - 127.5).abs().max() < 1
    nearest = convert_images(stripes, 16, 1, resize="nearest")
    assert set(nearest.unique().tolist()) <= {0, 255}


def test_normalize_matches_the_formula():
    data = task_from_arrays(
        "t", *fake_arrays(size=8).values(), LoadOptions(img_size=8), source={}, channels_last=True
    )
    x = data.test_x[:5]
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    out = data.normalize(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std, rtol=1e-6, atol=1e-5)
    whole = data.normalize(data.train_x)  # the data's own statistics standardise it
    torch.testing.assert_close(whole.mean((0, 2, 3)), torch.zeros(3), atol=0.02, rtol=0)
    torch.testing.assert_close(whole.std((0, 2, 3)), torch.ones(3), atol=0.02, rtol=0)
    with pytest.raises(DataError, match="normalize takes uint8"):
        data.normalize(x.float())


def test_apply_transform_reproduces_the_stored_preprocessing(tmp_path):
    arrays = fake_arrays(size=20, channels=3)
    np.savez(tmp_path / "d.npz", **arrays)
    task = load_task(f"npz:{tmp_path / 'd.npz'}", img_size=32, in_chans=1, resize="bicubic")
    record = json.loads(json.dumps(task.transform))  # as saved with a checkpoint
    again = apply_transform(record, arrays["test_x"], channels_last=True)
    assert torch.equal(again, task.test_x)
    pil = [Image.fromarray(a) for a in arrays["test_x"][:3]]
    assert torch.equal(apply_transform(record, pil), task.test_x[:3])
    assert record["resize"] == "bicubic" and record["img_size"] == 32
    hwc = list(arrays["test_x"][:3])  # a sequence of [H, W, C] arrays
    assert torch.equal(apply_transform(record, hwc, channels_last=True), task.test_x[:3])
    one = arrays["test_x"][0]
    with pytest.raises(DataError, match=r"one \[H, W, C\] image or \[N, H, W\].*images\[None\]"):
        apply_transform(record, one, channels_last=True)  # was read as 20 grey images
    assert torch.equal(apply_transform(record, one[None], channels_last=True), task.test_x[:1])
    grey = arrays["test_x"][:2, :, :, 0]  # no channel axis: the flag changes nothing
    grey_out = apply_transform(record, grey, channels_last=True)
    assert grey_out.shape == (2, 1, 32, 32) and torch.equal(grey_out, apply_transform(record, grey))


# ----------------------------------------------------------------------- subsets


def test_limits_take_seeded_class_balanced_subsets(tmp_path):
    arrays = fake_arrays(train=200, test=50, size=8)
    arrays["train_y"] = np.array([0] * 120 + [1] * 60 + [2] * 15 + [3] * 5)
    np.savez(tmp_path / "skewed.npz", **arrays)
    spec = f"npz:{tmp_path / 'skewed.npz'}"
    a = load_task(spec, img_size=8, train_limit=40, test_limit=10, seed=1)
    assert torch.bincount(a.train_y).tolist() == [12, 12, 11, 5]  # the rare class gives all it has
    assert sorted(torch.bincount(a.test_y).tolist()) == [2, 2, 3, 3]
    b = load_task(spec, img_size=8, train_limit=40, test_limit=10, seed=1)
    c = load_task(spec, img_size=8, train_limit=40, test_limit=10, seed=2)
    assert torch.equal(a.train_x, b.train_x)
    assert not torch.equal(a.train_x, c.train_x)
    full = load_task(spec, img_size=8)
    assert a.transform["mean"] == full.transform["mean"]  # statistics ignore the limits
    assert len(load_task(spec, img_size=8, train_limit=10_000).train_y) == 200
    picked = balanced_indices(torch.tensor([0, 0, 0, 1]), 2, seed=0)
    assert sorted(torch.tensor([0, 0, 0, 1])[picked].tolist()) == [0, 1]


# ---------------------------------------------------------- registry and roots


def test_data_root_prefers_argument_then_environment(monkeypatch, tmp_path):
    assert data_root() is None
    monkeypatch.setenv("MODNET_DATA_ROOT", str(tmp_path))
    assert data_root() == tmp_path
    assert data_root("elsewhere") == Path("elsewhere")
    fake_mnist(tmp_path)
    assert load_task("mnist", img_size=28, in_chans=1).train_x.shape == (30, 1, 28, 28)


def test_register_dataset_is_the_extension_point():
    def loader(spec: str, options: LoadOptions) -> TaskData:
        arrays = fake_arrays(size=options.img_size)
        return task_from_arrays(
            spec, *arrays.values(), options, source={"dataset": spec}, channels_last=True
        )

    register_dataset("my_set", loader)
    try:
        assert "my_set" in list_datasets()
        task = load_task("my_set", img_size=12, train_limit=8)
        assert task.name == "my_set" and task.train_x.shape == (8, 3, 12, 12)
        with pytest.raises(DataError, match="already registered: pass replace=True"):
            register_dataset("my_set", loader)
        register_dataset("my_set", lambda spec, options: "oops", replace=True)
        with pytest.raises(DataError, match="returned str, not TaskData.*task_from_arrays"):
            load_task("my_set")
    finally:
        unregister_dataset("my_set")
    assert "my_set" not in list_datasets()
    with pytest.raises(DataError, match="invalid dataset name"):
        register_dataset("my set", loader)


def test_list_datasets_names_every_builtin():
    names = list_datasets()
    for name in ("mnist", "fashion_mnist", "kmnist", "usps", "cifar10", "cifar100", "svhn"):
        assert name in names
    assert "mnist_m" in names and "synth_shape" in names


# ------------------------------------------------------------------------ errors


def test_unknown_dataset_lists_known_names_and_path_forms():
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'.*mnist.*'npz:PATH\.npz'.*"
                       r"'folder:DIR'"):  # fmt: skip
        load_task("imagenet")
    with pytest.raises(DataError, match="did you mean 'mnist'"):
        load_task("mnsit")


def test_unknown_dataset_message_folds_variants_and_still_names_every_dataset():
    with pytest.raises(DataError) as error:
        load_task("imagenet")
    message = str(error.value)
    assert "\n" not in message and len(message) < 500  # was 717 characters, 16 of them names
    assert "mnist, usps each also as NAME-colorize, -scale, -shear, -shot_noise" in message
    for name in list_datasets():  # every name is spelt out or folded into its base
        base, _, suffix = name.partition("-")
        assert name in message or (base in message and f"-{suffix}" in message), name


def test_a_bare_file_or_folder_name_is_pointed_at_its_reader(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"unknown dataset 'digits\.npz' \(.*did you mean 'npz:"):
        load_task("digits.npz")  # not even there: the suffix says what it is
    with pytest.raises(DataError, match=r"'images' \(a folder .*'folder:images' or 'shards:"):
        load_task("images")


def test_summarize_names_folds_only_suffixes_that_several_bases_share():
    from modnet.data.registry import summarize_names

    names = ["a", "a-x", "b", "b-x", "c", "c-y", "d-x"]
    assert summarize_names(names) == "a, b, c, c-y, d-x (a, b each also as NAME-x)"
    assert summarize_names(["a", "b"]) == "a, b"


def test_missing_root_says_how_to_set_it_and_download():
    with pytest.raises(
        DataError, match=r"MNIST needs a data root.*--data-root.*MODNET_DATA_ROOT.*--download"
    ):
        load_task("mnist")


def test_missing_files_say_which_files_were_looked_for_where(tmp_path):
    pattern = (
        r"MNIST not found in the data root .*: looked there for the torchvision files "
        r"MNIST/raw/train-images-idx3-ubyte.*--data-root.*--download"
    )
    with pytest.raises(DataError, match=pattern):
        load_task("mnist", root=tmp_path)
    with pytest.raises(DataError, match=r"cifar10_subset\.npz or cifar10\.npz"):
        load_task("cifar10", root=tmp_path)
    with pytest.raises(DataError, match=r"mnist_m_subset\.npz.*cannot download MNIST-M"):
        load_task("mnist_m", root=tmp_path)
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        load_task("usps", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no npz file at .*absent\.npz"):
        load_task(f"npz:{tmp_path / 'absent.npz'}")


def test_corrupt_files_ask_for_a_fresh_copy(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="could not read MNIST.*corrupt.*--download"):
        load_task("mnist", root=tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(test_x=np.zeros((0, 8, 8, 3), np.uint8), test_y=np.zeros(0, np.int64)),
         "the test split is empty"),
        (dict(train_y=np.arange(40) % 4 - 1), r"labels span -1\.\.3, outside 0\.\.3.*remap"),
        (dict(train_x=np.zeros((40, 5), np.uint8)), r"train_x: .*shape \(40, 5\).*\[N, H, W, C\]"),
        (dict(train_x=np.zeros((40, 8, 8, 3), np.float32)), r"got float32.*astype"),
        (dict(train_x=np.zeros((40, 8, 8, 7), np.uint8)), r"7 channels.*1, 3 or 4"),
        (dict(train_y=np.zeros(40) + 0.5), r"integer class indices"),
        (dict(test_y=np.arange(19) % 4), r"test_x has 20 images but test_y has 19 labels"),
    ],
)  # fmt: skip
def test_bad_npz_arrays_raise_with_the_fix(tmp_path, change, message):
    arrays = {**fake_arrays(size=8), **change}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_task(f"npz:{tmp_path / 'bad.npz'}", img_size=8)


def test_npz_missing_arrays_and_bad_archives(tmp_path):
    np.savez(tmp_path / "half.npz", train_x=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"lacks the arrays \['train_y', 'test_x', 'test_y'\]"):
        load_task(f"npz:{tmp_path / 'half.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read .*junk.npz as an npz archive.*numpy.savez"):
        load_task(f"npz:{tmp_path / 'junk.npz'}")


def test_bad_folders_describe_the_layout(tmp_path):
    root = tmp_path / "f"
    write_folder(root, "train", {"a": 2})
    with pytest.raises(DataError, match=r"lacks test/ \(or val/\).*one subfolder per class"):
        load_task(f"folder:{root}")
    write_folder(root, "test", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"classes \['zebra'\] that .*train lacks"):
        load_task(f"folder:{root}")
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    write_folder(empty, "test", {"a": 1})
    with pytest.raises(DataError, match="the train split is empty: no images"):
        load_task(f"folder:{empty}")
    (root / "test" / "zebra" / "000.png").unlink()
    (root / "test" / "zebra").rmdir()
    (root / "train" / "a" / "000.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read the image .*000\.png.*replace the file"):
        load_task(f"folder:{root}")
    with pytest.raises(DataError, match="no folder at"):
        load_task(f"folder:{tmp_path / 'missing'}")


def test_an_empty_class_folder_in_train_is_refused_not_made_a_class(tmp_path):
    root = tmp_path / "imgs"
    write_folder(root, "train", {"cat": 1, "dog": 1, "fish": 1})
    write_folder(root, "test", {"cat": 1, "dog": 1, "fish": 1})
    (root / "train" / "empty").mkdir()
    (root / "train" / "notes").mkdir()
    (root / "train" / "notes" / "readme.txt").write_text("no image")  # no image either
    with pytest.raises(DataError) as refused:
        load_task(f"folder:{root}")
    assert str(refused.value) == (
        f"{root / 'train'} has class folders ['empty', 'notes'] holding no images (.png, .jpg, "
        ".jpeg, .bmp, .gif, .webp, .tif, .tiff, .ppm), so the task would have 5 classes of "
        "which 2 no training image shows: remove them or add images to them"
    )
    (root / "train" / "notes" / "readme.txt").unlink()
    (root / "train" / "notes").rmdir()
    with pytest.raises(DataError, match=r"class folder \['empty'\] holding no .*remove it or add"):
        load_task(f"folder:{root}")
    (root / "train" / "empty").rmdir()
    assert load_task(f"folder:{root}").classes == ["cat", "dog", "fish"]


def test_options_and_task_data_are_validated():
    with pytest.raises(DataError, match="in_chans must be 1 .* or 3"):
        load_task("synth_shape", in_chans=4)
    with pytest.raises(DataError, match="train_limit must be a positive integer"):
        load_task("synth_shape", train_limit=0)
    with pytest.raises(DataError, match="unknown resize mode 'lanczos'"):
        load_task("synth_shape", resize="lanczos")
    with pytest.raises(DataError, match="give both mean and std"):
        load_task("synth_shape", mean=[0.5, 0.5, 0.5])
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    record = {"mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(DataError, match=r"labels span 0\.\.5, outside 0\.\.2"):
        TaskData("t", 3, x, torch.tensor([0, 1, 2, 5]), x, torch.zeros(4).long(), record)
    with pytest.raises(DataError, match="invalid task name 'a b'"):
        TaskData("a b", 3, x, torch.zeros(4).long(), x, torch.zeros(4).long(), record)
    with pytest.raises(DataError, match=r"transform\['mean'\] must list 3"):
        TaskData("t", 3, x, torch.zeros(4).long(), x, torch.zeros(4).long(), {})


def test_mean_std_override_for_evaluating_with_a_trained_tasks_statistics():
    task = load_task("synth_color", train_limit=16, test_limit=8, mean=[0.5] * 3, std=[0.25] * 3)
    assert task.mean == [0.5] * 3 and task.std == [0.25] * 3
    x = task.test_x[:2]
    torch.testing.assert_close(task.normalize(x), (x.float() / 255 - 0.5) / 0.25)


def test_a_single_class_task_is_warned_about(tmp_path):
    for split in ("train", "test"):
        write_folder(tmp_path / "one", split, {"cat": 3})
    with pytest.warns(UserWarning, match=r"task 'one' has a single class: every prediction is"):
        task = load_task(f"folder:{tmp_path / 'one'}", img_size=8)
    assert task.num_classes == 1
    write_folder(tmp_path / "one", "train", {"dog": 3})
    write_folder(tmp_path / "one", "test", {"dog": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two classes: no warning
        assert load_task(f"folder:{tmp_path / 'one'}", img_size=8).num_classes == 2
