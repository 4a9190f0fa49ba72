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


def _layout(x: torch.Tensor) -> str:
    return {(True, False): "NHWC", (False, True): "NCHW"}.get(
        (x.is_contiguous(memory_format=CL), x.is_contiguous()), "other"
    )


@pytest.mark.parametrize("in_chans", [3, 1])
def test_conv_family_runs_channels_last_by_default_with_equal_logits(in_chans, monkeypatch):
    # A one-channel image is both NCHW and NHWC; the stem then wrote NCHW, and
    # every layer after it kept that layout (grey digits ran the slower one).
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 3}, in_chans=in_chans)).eval()
    x = images(model)
    layouts = []
    conv2d = F.conv2d

    def recording(inp, weight, *args, **kwargs):
        # The stem's input may be either; a mixed batch's depthwise convolution
        # folds its samples into channels (one image of T * C channels).
        if inp.shape[0] > 1 and inp.shape[1] > 1:
            layouts.append(_layout(inp))
        return conv2d(inp, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", recording)
    with torch.no_grad():
        features = model.forward_features(x, "a")
        assert _layout(features) == "NHWC"
        model(x, torch.tensor([0, 1, 0, 1]))  # a batch of two tasks
        model.train()(x, "a")
        model.eval()
    assert len(layouts) >= 3 * model.depth and set(layouts) == {"NHWC"}
    with torch.no_grad():
        default = model(x, "a")
        model.trunk.memory_format = torch.contiguous_format
        nchw = model(x, "a")
        assert model.forward_features(x, "a").is_contiguous()
    torch.testing.assert_close(default, nchw, rtol=0, atol=1e-5)
