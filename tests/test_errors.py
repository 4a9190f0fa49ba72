"""Bad input raises an error that names the problem and the fix."""

import pytest
import torch

import modnet
from modnet.families.conv import make_inverted_residual
from tests.conftest import images, tiny_conv, tiny_vit


@pytest.fixture
def model():
    return tiny_conv(tasks={"digits": 10, "fashion": 10})


def test_unknown_task(model):
    with pytest.raises(KeyError, match="unknown task 'cifar'.*add_task"):
        model(images(model), "cifar")
    with pytest.raises(KeyError, match="unknown task"):
        model.set_route("cifar", [0])


def test_missing_task_when_several_exist(model):
    with pytest.raises(ValueError, match="several tasks.*pass task="):
        model(images(model))


def test_task_index_and_ids_out_of_range(model):
    with pytest.raises(ValueError, match="task index 5 is out of range"):
        model(images(model), 5)
    with pytest.raises(ValueError, match=r"task ids must lie in \[0, 2\)"):
        model(images(model), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="got 3 task ids for a batch of 4"):
        model(images(model), torch.tensor([0, 1, 1]))


def test_route_too_long_or_empty(model):
    with pytest.raises(ValueError, match="has 5 entries: it needs between 1 and 4"):
        model.set_route("digits", [0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match="has 0 entries"):
        model.set_route("digits", [])


def test_route_index_out_of_range(model):
    with pytest.raises(ValueError, match=r"route index 3 at layer 1 .* out of range.*0\.\.2"):
        model.set_route("digits", [0, 3])
    with pytest.raises(ValueError, match="out of range"):
        model.set_route("digits", [-1])


def test_soft_route_of_wrong_shape(model):
    with pytest.raises(ValueError, match="has 3 layers but the model has depth 4"):
        model.set_route("digits", torch.rand(3, 3))
    with pytest.raises(ValueError, match="uses 5 templates but the pool has 3.*grow"):
        model.set_route("digits", torch.rand(4, 5))
    with pytest.raises(ValueError, match="one per block tensor"):
        model.set_route("digits", torch.rand(4, 3, 2))
    # fewer templates than the pool: only what a route made before the pool grew covers
    with pytest.raises(ValueError, match=r"covers 2 templates, but .* chunks covering \[3\]"):
        model.set_route("digits", torch.rand(4, 2))
    model.grow(2)
    model.set_route("digits", torch.rand(4, 3))  # the first chunk: a route from before growth
    with pytest.raises(ValueError, match=r"covers 4 templates.*\[3, 5\]: give coefficients for 5"):
        model.set_route("digits", torch.rand(4, 4))


def test_a_route_of_the_wrong_kind_is_one_clear_error(model):
    for value in ("abc", None, 3, {"route": [0]}, [0.5, 1.9], [True, False], torch.ones(2) > 0):
        with pytest.raises(ValueError, match=r"must be a list of integer template indices, a"):
            model.set_route("digits", value)


def test_images_of_wrong_size_channels_or_rank():
    for build in (tiny_conv, tiny_vit):
        net = build(num_classes=2)
        size = net.pretrained_cfg["input_size"][1]
        with pytest.raises(ValueError, match=f"expected {size}x{size} images, got 28x28.*resize"):
            net(torch.randn(2, 3, 28, 28))
        with pytest.raises(
            ValueError, match="expected 3-channel images, got 1 channels.*in_chans=1"
        ):
            net(torch.randn(2, 1, size, size))
        with pytest.raises(ValueError, match=r"expected a batch of images \[B, C, H, W\]"):
            net(torch.randn(3, size, size))


def test_mismatched_template_shapes():
    blocks = [make_inverted_residual(8, 2.0, "relu6"), make_inverted_residual(16, 2.0, "relu6")]
    with pytest.raises(ValueError, match="template 1 has 'conv_pw.weight' of shape"):
        modnet.TemplatePool(blocks)
    vit_block = tiny_vit(num_classes=2).pool._binder.module
    with pytest.raises(ValueError, match="does not match the pool's block architecture"):
        modnet.TemplatePool([blocks[0], vit_block])


def test_invalid_or_duplicate_task_names(model):
    with pytest.raises(ValueError, match="already exists"):
        model.add_task("digits", 3)
    with pytest.raises(ValueError, match="invalid task name 'a.b'"):
        model.add_task("a.b", 3)
    with pytest.raises(ValueError, match="reserved"):
        model.add_task("keys", 3)
    with pytest.raises(ValueError, match="num_classes >= 0"):
        model.add_task("negative", -1)


def test_unknown_options():
    with pytest.raises(ValueError, match="unknown route kind 'soft'"):
        tiny_conv(num_classes=2, route="soft")
    with pytest.raises(ValueError, match="unknown route_init"):
        tiny_conv(num_classes=2, route_init="zeros")
    with pytest.raises(ValueError, match="grow needs count >= 1"):
        tiny_conv(num_classes=2).grow(0)
    with pytest.raises(ValueError, match="unknown init"):
        tiny_conv(num_classes=2).grow(1, init="zeros")
