"""BatchNorm folded into the convolution before it, in inference (``modnet.folding``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images, moved_off_init, tiny_conv, tiny_vit
from torch import nn

import modnet
from modnet.folding import ConvNormPair, FoldedRunner, conv_norm_pairs


@pytest.fixture
def folded_calls(monkeypatch):
    """Counts the layers that ran folded."""
    calls = []
    run = FoldedRunner.run

    def counted(self, tensors, x):
        calls.append(x.shape[0])
        return run(self, tensors, x)

    monkeypatch.setattr(FoldedRunner, "run", counted)
    return calls


def trained_statistics(model: modnet.ModularNet, steps: int = 3) -> modnet.ModularNet:
    """Templates off their initial values and running statistics moved off (0, 1)."""
    moved_off_init(model)
    model.train()
    with torch.no_grad():
        for step in range(steps):
            for task in model.task_names:
                model(images(model, batch=8, seed=step) * 2 + 0.5, task)
    return model.eval()


def folded_and_plain(model, x, task):
    with torch.no_grad():
        folded = model.set_batchnorm_folding(True)(x, task)
        plain = model.set_batchnorm_folding(False)(x, task)
    model.set_batchnorm_folding(True)
    return folded, plain


@pytest.mark.parametrize(
    "route_kwargs, task_route",
    [
        (dict(), None),
        (dict(route="hard"), [2, 2, 0]),  # repeats, and shorter than the model
        (dict(anisotropic=True), None),
        (dict(route="hyper", hyper_dim=4, hyper_hidden=8), None),
        (dict(route="linear"), None),
    ],
    ids=["softmax", "hard-short", "anisotropic", "hyper", "linear"],
)
def test_inference_folds_every_layer_and_matches_the_unfolded_model(
    folded_calls, route_kwargs, task_route
):
    model = tiny_conv(tasks={"a": 3, "b": 3}, **route_kwargs)
    if task_route is not None:
        model.set_route("a", task_route)
    trained_statistics(model)
    x = images(model, batch=5)
    folded, plain = folded_and_plain(model, x, "a")
    depth = len(task_route) if task_route is not None else model.depth
    assert folded_calls == [5] * depth  # every layer folded, none of the unfolded run
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
    assert plain.abs().max() > 0.1  # the comparison is not of near-zero outputs


def test_folding_is_exact_arithmetic_in_float64_and_close_in_bfloat16():
    model = trained_statistics(tiny_conv(tasks={"a": 3}))
    x = images(model)
    wide = copy.deepcopy(model).double()
    folded, plain = folded_and_plain(wide, x.double(), "a")
    torch.testing.assert_close(folded, plain, rtol=1e-12, atol=1e-13)
    narrow = copy.deepcopy(model).bfloat16()
    folded, plain = folded_and_plain(narrow, x.bfloat16(), "a")
    assert folded.dtype == torch.bfloat16
    torch.testing.assert_close(folded.float(), plain.float(), rtol=0.05, atol=0.05)


def test_only_inference_folds(folded_calls):
    model = trained_statistics(tiny_conv(tasks={"a": 3}))
    x = images(model)
    model(x, "a")  # eval mode, autograd on: gradients need the BatchNorms as they are
    model.train()
    before = model.norm_stats["a"].layer_stack("bn1.running_mean").clone()
    with torch.no_grad():  # training mode without autograd (re-estimating statistics)
        model(x, "a")
    assert not torch.equal(model.norm_stats["a"].layer_stack("bn1.running_mean"), before)
    model.freeze_norm_stats()  # norms in eval mode, the blocks' drop path still in training
    with torch.no_grad():
        model(x, "a")
    model.eval().set_batchnorm_folding(False)
    with torch.no_grad():
        model(x, "a")
    assert folded_calls == []
    model.set_batchnorm_folding()
    with torch.inference_mode():
        model(x, "a")
    assert folded_calls == [4] * model.depth


def test_a_copy_folds_by_its_own_mode(folded_calls):
    model = trained_statistics(tiny_conv(tasks={"a": 3}))
    twin = copy.deepcopy(model)
    model.train()
    x = images(model)
    with torch.no_grad():
        twin(x, "a")
        assert len(folded_calls) == model.depth
        model(x, "a")
        assert len(folded_calls) == model.depth


def test_vit_blocks_have_nothing_to_fold():
    model = tiny_vit(tasks={"a": 3}).eval()
    with torch.no_grad():
        assert model.pool.folding() is None
    assert conv_norm_pairs(model.pool._binder.module) == []


def test_the_inverted_residual_folds_its_three_convolutions():
    model = tiny_conv(tasks={"a": 3})
    assert conv_norm_pairs(model.pool._binder.module) == [
        ConvNormPair("conv_pw", "bn1", affine=True, conv_bias=False),
        ConvNormPair("conv_dw", "bn2", affine=True, conv_bias=False),
        ConvNormPair("conv_pwl", "bn3", affine=True, conv_bias=False),
    ]


class BiasedBlock(nn.Module):
    """A conv with a bias before a BatchNorm without affine parameters, and a conv
    whose output is used twice (its BatchNorm cannot be folded)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(channels, affine=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        z = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.bn2(z) + z


def test_a_conv_bias_and_a_norm_without_affine_fold_and_a_shared_output_does_not():
    pool = modnet.TemplatePool([BiasedBlock() for _ in range(3)]).eval()
    folding = pool.__dict__["_folded"]
    assert folding.pairs == [ConvNormPair("conv1", "bn1", affine=False, conv_bias=True)]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(torch.randn(p.shape, generator=generator))
    layers = 2
    weights = pool.mix(torch.softmax(torch.randn(layers, 3, generator=generator), -1))
    stats = {
        "bn1.running_mean": torch.randn(layers, 4, generator=generator),
        "bn1.running_var": torch.rand(layers, 4, generator=generator) + 0.1,
        "bn2.running_mean": torch.randn(layers, 4, generator=generator),
        "bn2.running_var": torch.rand(layers, 4, generator=generator) + 0.1,
        "bn1.num_batches_tracked": torch.zeros(layers, dtype=torch.long),
        "bn2.num_batches_tracked": torch.zeros(layers, dtype=torch.long),
    }
    x = torch.randn(3, 4, 5, 5, generator=generator)
    stacked = folding.fold({**weights, **stats})  # every layer at once
    with torch.no_grad():
        for layer in range(layers):
            one = {n: w[layer] for n, w in weights.items()}
            layer_stats = {n: s[layer] for n, s in stats.items()}
            folded = pool.run(x, one, layer_stats)  # folds this layer
            pool.fold_batchnorm = False
            plain = pool.run(x, one, layer_stats)
            pool.fold_batchnorm = True
            prefolded = pool.run(x, {n: w[layer] for n, w in stacked.items()}, {}, folded=True)
            torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
            assert torch.equal(prefolded, folded)


def test_set_batchnorm_folding_takes_a_bool():
    model = tiny_conv(tasks={"a": 3})
    assert model.set_batchnorm_folding(False) is model
    with pytest.raises(TypeError, match=r"^enable must be True or False, got 'no'$"):
        model.set_batchnorm_folding("no")


@pytest.mark.parametrize("mixed_batches", ["chunked", "grouped"])
def test_mixed_task_batches_fold_too(folded_calls, monkeypatch, mixed_batches):
    model = tiny_conv(tasks={f"t{i}": 3 for i in range(6)})
    model.set_route("t5", [1, 0])  # a shorter route: its samples skip the last layers
    trained_statistics(model, steps=1)
    model.mixed_batches = mixed_batches
    grouped_calls = []
    runner = model.pool.__dict__["_folded"].grouped
    call = type(runner).__call__
    monkeypatch.setattr(
        type(runner),
        "__call__",
        lambda self, *a, **k: grouped_calls.append(self is runner) or call(self, *a, **k),
    )
    x = images(model, batch=12)
    ids = torch.arange(12) % 6
    folded, plain = folded_and_plain(model, x, ids)
    assert grouped_calls.count(True) == model.depth  # one folded grouped call per layer
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        alone = torch.cat([model(x[ids == t], t) for t in range(6)])
    order = torch.argsort(ids, stable=True)
    torch.testing.assert_close(folded[order], alone, rtol=1e-5, atol=1e-6)


class SharedConvBlock(nn.Module):
    """One conv called twice (once before a BatchNorm), one BatchNorm called twice."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x) + self.bn(self.conv2(x))


def test_a_module_called_twice_is_not_folded():
    assert conv_norm_pairs(SharedConvBlock()) == []
    pool = modnet.TemplatePool([SharedConvBlock(), SharedConvBlock()]).eval()
    with torch.no_grad():
        assert pool.folding() is None  # the block runs as it is, even in inference


def test_a_norm_whose_activation_has_weights_is_not_folded():
    model = trained_statistics(tiny_conv(tasks={"a": 3}, act="prelu"))
    assert [p.norm for p in model.pool.__dict__["_folded"].pairs] == ["bn3"]  # no act
    folded, plain = folded_and_plain(model, images(model), "a")
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)
