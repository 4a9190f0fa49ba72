"""channels_last: converting any model works, and the conv family runs NHWC by default."""

import pytest
import timm
import torch
import torch.nn.functional as F

import modnet
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit

CL = torch.channels_last


def tiny_timm() -> modnet.ModularNet:
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=3
    )
    return modnet.from_timm(vit, task="a", route="softmax")


@pytest.mark.parametrize("route", ["softmax", "hard"])
@pytest.mark.parametrize("build", [tiny_conv, tiny_vit, tiny_timm])
def test_to_channels_last_keeps_the_logits(build, route):
    model = build() if build is tiny_timm else build(tasks={"a": 3}, route=route)
    model = moved_off_init(model).eval()
    x = images(model)
    with torch.no_grad():
        before = model(x, "a")
        assert model.to(memory_format=CL) is model
        torch.testing.assert_close(model(x, "a"), before, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            model(x.contiguous(memory_format=CL), "a"), before, atol=1e-5, rtol=0
        )
    for name in model.pool.tensor_names:
        stacked = model.pool.stacked(name)
        if stacked.dim() == 5:  # every template's conv weight is a channels_last 4-D tensor
            assert all(t.is_contiguous(memory_format=CL) for t in stacked.unbind(0))
    model.train()
    F.cross_entropy(model(x, "a"), torch.tensor([0, 1, 2, 0])).backward()
    model.grow(1)  # growth after the conversion still works
    assert torch.isfinite(model(x, "a")).all()


def test_conv_family_runs_channels_last_by_default_with_equal_logits():
    model = moved_off_init(tiny_conv(tasks={"a": 3})).eval()
    x = images(model)
    with torch.no_grad():
        features = model.forward_features(x, "a")
        assert features.is_contiguous(memory_format=CL)
        default = model(x, "a")
        model.trunk.memory_format = torch.contiguous_format
        nchw = model(x, "a")
        assert model.forward_features(x, "a").is_contiguous()
    torch.testing.assert_close(default, nchw, rtol=0, atol=1e-5)
