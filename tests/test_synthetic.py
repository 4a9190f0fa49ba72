"""The built-in synthetic suite: determinism, labels that really determine images, domains."""

from __future__ import annotations

import json
import math

import pytest
import torch

from modnet.data import (
    HELD_OUT_PAIRS,
    SYNTHETIC_DEFAULT_TASKS,
    DataError,
    load_task,
    make_synthetic,
    parse_synthetic_spec,
)
from modnet.data.synthetic import ATTRIBUTES, render_synthetic, synthetic_scenes


def nearest_class_mean(train_x, train_y, test_x, test_y, classes: int) -> float:
    """Accuracy of the nearest class mean on raw pixels: a floor on how learnable labels are."""
    train_x, test_x = train_x.flatten(1).float(), test_x.flatten(1).float()
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(classes)])
    return (torch.cdist(test_x, means).argmin(1) == test_y).float().mean().item()


@pytest.fixture(scope="module")
def clean():
    train = make_synthetic(1200, seed=0, split="train")
    test = make_synthetic(400, seed=0, split="test")
    return train, test


def test_default_tasks_load_with_sizes_dtypes_and_balanced_labels():
    assert 3 <= len(SYNTHETIC_DEFAULT_TASKS) <= 4
    for spec in SYNTHETIC_DEFAULT_TASKS:
        task = load_task(spec, train_limit=240, test_limit=60)
        assert task.name == spec
        assert task.train_x.shape == (240, 3, 32, 32) and task.test_x.shape == (60, 3, 32, 32)
        assert task.train_x.dtype == torch.uint8 and task.train_y.dtype == torch.int64
        counts = torch.bincount(task.train_y, minlength=task.num_classes)
        assert counts.max() - counts.min() <= 1  # every class equally often
        assert task.classes == list(parse_synthetic_spec(spec).classes)
        assert 0.05 < task.train_x.float().mean() / 255 < 0.6
        json.dumps(task.transform)


def test_default_size_and_channels_and_image_size():
    task = load_task("synth_color")
    assert (len(task.train_y), len(task.test_y)) == (2400, 1000)
    gray = load_task("synth_color", in_chans=1, img_size=48, train_limit=16, test_limit=8)
    assert gray.train_x.shape == (16, 1, 48, 48)
    assert gray.transform["channel_conversion"] == "luminance"
    assert gray.transform["source_size"] == [48, 48]  # drawn at the size asked, not resized


def test_bit_identical_from_the_seed_and_different_with_another():
    a = load_task("synth_shape-bg-noise", train_limit=64, test_limit=32, seed=3)
    b = load_task("synth_shape-bg-noise", train_limit=64, test_limit=32, seed=3)
    c = load_task("synth_shape-bg-noise", train_limit=64, test_limit=32, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert torch.equal(a.train_y, b.train_y)
    assert (a.train_x != c.train_x).float().mean() > 0.5
    assert not torch.equal(a.train_y, c.train_y)
    assert a.transform == b.transform


def test_tasks_label_the_same_images_and_test_ignores_train_limit():
    shape = load_task("synth_shape", train_limit=100, test_limit=50)
    color = load_task("synth_color", train_limit=300, test_limit=50)
    assert torch.equal(shape.test_x, color.test_x)
    assert not torch.equal(shape.test_y, color.test_y)
    assert not torch.equal(shape.train_x, shape.test_x[:50].repeat(2, 1, 1, 1))
    # statistics come from a fixed sample: the same whatever the limits
    assert shape.transform["mean"] == color.transform["mean"]


def test_colour_position_and_size_are_learnable_from_raw_pixels(clean):
    (train_x, train), (test_x, test) = clean
    chance = {name: 1 / len(values) for name, values in ATTRIBUTES.items()}
    accuracy = {
        name: nearest_class_mean(train_x, train[name], test_x, test[name], len(ATTRIBUTES[name]))
        for name in ("color", "position", "size")
    }
    assert accuracy["color"] > chance["color"] + 0.3, accuracy
    assert accuracy["position"] > chance["position"] + 0.5, accuracy
    assert accuracy["size"] > chance["size"] + 0.1, accuracy


def test_size_classes_cover_increasing_areas(clean):
    (images, labels), _ = clean
    background = images[:, :, :1, :1]  # the corner is never covered by the shape
    covered = ((images.int() - background.int()).abs().amax(1) > 20).flatten(1).sum(1).float()
    areas = [covered[labels["size"] == z].mean().item() for z in range(3)]
    assert areas[0] * 1.6 < areas[1] and areas[1] * 1.4 < areas[2], areas


def test_shapes_have_their_geometry():
    """Four images that differ only in shape: distinct masks with the areas geometry says."""
    scenes = synthetic_scenes(4, img_size=64)
    radius = 12.0
    scenes.update(
        shape=torch.arange(4),
        cx=torch.full((4,), 32.0),
        cy=torch.full((4,), 32.0),
        radius=torch.full((4,), radius),
        angle=torch.zeros(4),
        background=torch.zeros(4),
        value=torch.ones(4),
    )
    images = render_synthetic(scenes, img_size=64)
    area = images.float().amax(1).div(255).div(scenes["value"].view(-1, 1, 1)).sum((1, 2))
    expected = [
        math.pi * radius**2,  # circle
        (1.7 * radius) ** 2,  # square, half side 0.85 r
        3 * math.sqrt(3) * (0.6 * radius) ** 2,  # triangle, inradius 0.6 r
        2 * (2 * radius * 0.6 * radius) - (0.6 * radius) ** 2,  # cross
    ]
    for got, want in zip(area.tolist(), expected, strict=True):
        assert abs(got - want) < 0.04 * want, (area, expected)
    masks = images.amax(1) > 127
    for i in range(4):
        for j in range(i + 1, 4):
            assert (masks[i] ^ masks[j]).sum() > 20


def test_holdout_excludes_the_held_out_pairs_from_train_and_tests_only_them():
    shapes, colors = ATTRIBUTES["shape"], ATTRIBUTES["color"]
    held = {(shapes.index(s), colors.index(c)) for s, c in HELD_OUT_PAIRS}
    train = synthetic_scenes(3000, split="train", holdout=True)
    test = synthetic_scenes(600, split="test", holdout=True)
    train_pairs = set(zip(train["shape"].tolist(), train["color"].tolist(), strict=True))
    test_pairs = set(zip(test["shape"].tolist(), test["color"].tolist(), strict=True))
    assert not train_pairs & held
    assert test_pairs == held
    assert set(train["shape"].tolist()) == set(range(len(shapes)))
    assert set(train["color"].tolist()) == set(range(len(colors)))
    # only the clashing images were recoloured: the other attributes are the plain ones
    plain = synthetic_scenes(3000, split="train")
    assert torch.equal(plain["shape"], train["shape"])
    changed = (plain["color"] != train["color"]).float().mean().item()
    assert 0.1 < changed < 0.25  # 1 colour in 6 clashes for each shape
    task = load_task("synth_shape-holdout", train_limit=200, test_limit=100)
    assert task.transform["source"]["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS]


@pytest.mark.parametrize("domain", ["bg", "color", "noise"])
def test_domains_change_pixels_not_labels(domain):
    base = load_task("synth_shape", train_limit=300, test_limit=100)
    shifted = load_task(f"synth_shape-{domain}", train_limit=300, test_limit=100)
    assert torch.equal(base.train_y, shifted.train_y) and torch.equal(base.test_y, shifted.test_y)
    x, y = base.train_x.float(), shifted.train_x.float()
    assert (x - y).abs().mean() > 8  # gray levels
    if domain == "noise":  # high-frequency energy goes up
        assert (y.diff(dim=-1).abs().mean()) > 2 * x.diff(dim=-1).abs().mean()
    if domain == "bg":  # backgrounds get colour and texture
        corner = lambda t: t[:, :, :4, :4].flatten(1).std(1).mean()  # noqa: E731
        assert corner(y) > 5 * corner(x) + 1
    if domain == "color":  # a global cast moves the channel balance
        assert (x.mean((0, 2, 3)) - y.mean((0, 2, 3))).abs().max() > 3
    assert shifted.transform["source"]["domains"] == [domain]
    assert shifted.transform["mean"] != base.transform["mean"]


def test_modifiers_combine_in_any_order_to_the_same_images():
    a = load_task("synth_size-noise-bg", train_limit=32, test_limit=16)
    b = load_task("synth_size-bg-noise", train_limit=32, test_limit=16)
    assert torch.equal(a.train_x, b.train_x)
    assert parse_synthetic_spec("synth_size-noise-bg-holdout").domains == ("bg", "noise")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("synth_texture", r"unknown synthetic attribute 'texture'.*synth_<attribute>"),
        ("synth_shape-blur", r"unknown modifier.*'blur'.*\['bg', 'color', 'noise', 'holdout'\]"),
        ("synth_shape-bg-bg", r"repeats a modifier"),
        ("synth", r"unknown synthetic dataset 'synth'.*e\.g\. synth_shape"),
    ],
)
def test_bad_synthetic_specs_name_the_syntax(spec, message):
    with pytest.raises(DataError, match=message):
        load_task(spec, train_limit=8, test_limit=8)
