"""bf16 autocast: every route kind of every family trains and evaluates, close to fp32.

Measured: bf16 logits differ from fp32 by at most about 0.02 on logits of size
about 1 (tiny models below); the tolerance is 0.05 absolute plus 0.05 relative.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import modnet
from modnet.cli import main
from modnet.train import TrainConfig
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit

ROUTES = [("hard", False), ("softmax", False), ("linear", False), ("hyper", False)]
ROUTES += [("softmax", True), ("hyper", True)]  # anisotropic


def build(family: str, route: str, anisotropic: bool) -> modnet.ModularNet:
    if family == "timm":
        vit = timm.create_model(
            "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=3
        )
        model = modnet.from_timm(vit, task="a", route=route)  # "a" keeps its hard route
        model.reset_classifier(3, task="a")
        model.add_task("b", 3)
        return moved_off_init(model)
    make = tiny_conv if family == "conv" else tiny_vit
    return moved_off_init(make(tasks={"a": 3, "b": 3}, route=route, anisotropic=anisotropic))


def test_soft_route_evaluates_under_bf16_autocast():
    net = timm.create_model("modnet_conv_tiny", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), net(x), atol=5e-2, rtol=5e-2)


CASES = [(family, *route) for family in ("conv", "vit") for route in ROUTES]
CASES += [("timm", route, False) for route in ("hard", "softmax", "linear", "hyper")]


@pytest.mark.parametrize(("family", "route", "anisotropic"), CASES)
def test_every_route_kind_trains_and_evaluates_in_bf16(family, route, anisotropic):
    model = build(family, route, anisotropic)
    x, y, ids = images(model, batch=6), torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6) % 2
    for mode in ("train", "eval"):
        getattr(model, mode)()
        for task in ("a", ids):
            with torch.no_grad():
                reference = model(x, task)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x, task)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)
    model.train().zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x, ids).float(), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)


def test_auto_precision_resolves_to_the_family_default():
    model = tiny_conv(tasks={"a": 3})
    assert model.default_precision in ("fp32", "bf16")
    assert TrainConfig().precision == "auto"
    assert TrainConfig().resolved_precision(model) == model.default_precision
    assert TrainConfig(precision="bf16").resolved_precision(model) == "bf16"


def test_train_command_trains_in_bf16(tmp_path, capsys):
    args = ["--model-arg", "depth=2", "--model-arg", "width=8", "--model-arg", "exp_ratio=2.0"]
    args += ["--model-arg", "img_size=16", "--train-limit", "64", "--test-limit", "16"]
    args += ["--batch-size", "32", "--epochs", "1", "--no-progress", "--precision", "bf16"]
    code = main(["train", "--tasks", "synth_color,synth_size", *args, "--out", str(tmp_path / "r")])
    assert code == 0
    assert "synth_color" in capsys.readouterr().out


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_a_model_moved_to_bf16_keeps_every_tensor_in_bf16_after_running(build):
    """Forward and training passes put each task's statistics in place for the call and
    then the model's own tensors back: those of after ``.to()``, not of its creation."""
    model = build(tasks={"a": 3}).to(torch.bfloat16)
    x = images(model, 4).to(torch.bfloat16)
    model(x, task="a").float().sum().backward()
    model.eval()(x, task="a")
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {
        torch.bfloat16
    }
    net = model.export("a").eval()  # copies the trunk's tensors
    torch.testing.assert_close(net(x), model(x, task="a"), rtol=0, atol=0)
