"""Training augmentation: per-dataset policies, seeded per sample, recorded, never at evaluation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from modnet.cli import main
from modnet.data import TrainBatches, build_augmentation, load_task, policy_for
from modnet.data.augment import augment_images, augment_record, sample_seed
from modnet.train import MultiTaskSchedule, evaluate
from tests.conftest import tiny_conv


def crops(image: torch.Tensor, padding: int, flips: bool) -> list[torch.Tensor]:
    """Every image the pad-and-crop (and flip) can make from ``image``."""
    padded = F.pad(image, (padding,) * 4)
    size = image.shape[-1]
    found = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + size, left : left + size]
            found += [crop, crop.flip(-1)] if flips else [crop]
    return found


@pytest.mark.parametrize(
    ("source", "policy"),
    [
        ({"dataset": "cifar10"}, "crop_flip"),
        ({"dataset": "cifar100"}, "crop_flip"),
        ({"dataset": "fashion_mnist"}, "crop_flip"),
        ({"dataset": "folder"}, "crop_flip"),
        ({"dataset": "mnist"}, "crop"),
        ({"dataset": "svhn"}, "crop"),
        ({"dataset": "usps"}, "crop"),
        ({"dataset": "kmnist"}, "crop"),
        ({"dataset": "npz"}, "crop"),
        ({"dataset": "mnist-shear", "base": {"dataset": "mnist"}}, "crop"),
        ({"dataset": "synthetic", "attribute": "shape"}, "crop_flip"),
        ({"dataset": "synthetic", "attribute": "position"}, "none"),
    ],
)
def test_digits_and_text_are_never_flipped(source, policy):
    assert policy_for(source) == policy


def test_the_policy_is_recorded_only_when_asked():
    plain = load_task("synth_shape", img_size=16, train_limit=8, test_limit=4)
    task = load_task("synth_shape", img_size=16, train_limit=8, test_limit=4, augment=True)
    assert "augment" not in plain.transform
    assert task.transform["augment"] == {"policy": "crop_flip", "padding": 2}
    assert augment_record({"source": {"dataset": "cifar10"}, "img_size": 32}) == {
        "policy": "crop_flip",
        "padding": 4,
    }
    assert torch.equal(plain.train_x, task.train_x)  # stored images are never augmented
    assert build_augmentation(plain.transform) is None


@pytest.mark.parametrize("policy", ["crop_flip", "crop"])
def test_each_sample_is_a_seeded_crop_and_only_crop_flip_flips(policy):
    record = {"img_size": 8, "augment": {"policy": policy, "padding": 2}}
    transform = build_augmentation(record)
    image = torch.arange(3 * 64, dtype=torch.uint8).view(1, 3, 8, 8)  # no symmetry
    seeds = [sample_seed(0, 5, 0, n) for n in range(40)]
    out = augment_images(image.expand(40, -1, -1, -1), transform, seeds)
    again = augment_images(image.expand(40, -1, -1, -1), transform, seeds)
    assert torch.equal(out, again)
    allowed = crops(image[0], 2, flips=policy == "crop_flip")
    flipped = 0
    for sample in out:
        match = [i for i, c in enumerate(allowed) if torch.equal(sample, c)]
        assert match, "not a pad-and-crop of the image"
        flipped += policy == "crop_flip" and match[0] % 2 == 1
    assert len({tuple(s.flatten().tolist()) for s in out}) > 10  # seeds differ, crops differ
    if policy == "crop_flip":
        assert 8 <= flipped <= 32


def test_augmentation_leaves_the_global_random_state_alone():
    transform = build_augmentation(
        {"img_size": 8, "augment": {"policy": "crop_flip", "padding": 2}}
    )
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    augment_images(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), transform, [1, 2, 3, 4])
    assert torch.equal(torch.rand(3), expected)


def test_batches_are_augmented_per_step_and_rank_and_evaluation_never_is():
    plain = {"s": load_task("synth_shape", img_size=16, train_limit=40, test_limit=30)}
    augmented = {
        "s": load_task("synth_shape", img_size=16, train_limit=40, test_limit=30, augment=True)
    }
    schedule = MultiTaskSchedule([40], batch_size=8, seed=1)
    a = TrainBatches(augmented, schedule, seed=2)
    x0, y0, _ = a(0)
    assert torch.equal(x0, TrainBatches(augmented, schedule, seed=2)(0)[0])
    assert not torch.equal(x0, TrainBatches(plain, schedule, seed=2)(0)[0])
    assert not torch.equal(x0, TrainBatches(augmented, schedule, seed=3)(0)[0])
    assert torch.equal(y0, TrainBatches(plain, schedule, seed=2)(0)[1])
    model = tiny_conv(img_size=16, tasks={"s": 4})
    assert evaluate(model, augmented) == evaluate(model, plain)


def test_cli_augment_is_recorded_in_the_manifest(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--tasks",
            "synth_color,synth_position",
            "--model-arg",
            "width=8",
            "--model-arg",
            "img_size=8",
            "--model-arg",
            "depth=2",
            "--train-limit",
            "32",
            "--test-limit",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--augment",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    manifest = json.loads(next(out.rglob("manifest.json")).read_text())
    records = {name: task["transform"] for name, task in manifest["tasks"].items()}
    assert records["synth_color"]["augment"] == {"policy": "crop_flip", "padding": 1}
    assert records["synth_position"]["augment"] == {"policy": "none", "padding": 1}
