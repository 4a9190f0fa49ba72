"""Diagonal Fisher information and the second-order penalties, against plain loops."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import images, moved_off_init, tiny_conv
from torch import nn

from modnet.compose import (
    FisherDiagonal,
    TaskVector,
    diagonal_fisher,
    ensemble_penalty,
    individual_penalty,
)


def reference_fisher(model, x, names, labels=None, **kwargs):
    """The definition, one sample and one class at a time with autograd."""
    params = dict(model.named_parameters())
    totals = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()
    for i in range(len(x)):
        logp = model(x[i : i + 1], **kwargs)[0].log_softmax(-1)
        classes = range(len(logp)) if labels is None else [int(labels[i])]
        for c in classes:
            grads = torch.autograd.grad(logp[c], [params[n] for n in names], retain_graph=True)
            weight = logp[c].exp().detach() if labels is None else 1.0
            for n, g in zip(names, grads, strict=True):
                totals[n] += weight * g.pow(2) / len(x)
    return totals


@pytest.fixture
def net():
    model = moved_off_init(tiny_conv(tasks={"a": 4, "b": 3}, route="hard", num_templates=4))
    return model.requires_grad_(True)


def test_exact_fisher_equals_the_per_sample_loop(net):
    x = images(net, 6)
    names = [n for n, _ in net.named_parameters() if not n.startswith("heads.b")]
    fisher = diagonal_fisher(net, x, names=names, batch_size=4, model_kwargs={"task": "a"})
    expected = reference_fisher(net, x, names, task="a")
    assert fisher.samples == 6 and set(fisher.names) == set(names)
    for name in names:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-9)
    assert not any(v.requires_grad for v in fisher.values.values())


def test_sampled_fisher_uses_labels_from_the_predictive_distribution():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(10, 5)
    fisher = diagonal_fisher(model, x, mode="sampled", batch_size=10, generator=gen(3))
    with torch.no_grad():
        labels = torch.multinomial(model(x).softmax(-1), 1, generator=gen(3))[:, 0]
    expected = reference_fisher(model, x, [n for n, _ in model.named_parameters()], labels)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], value, rtol=1e-4, atol=1e-9)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fisher_accepts_batches_and_restores_the_mode():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    x = torch.randn(8, 4)
    whole = diagonal_fisher(model, x, batch_size=3)
    batched = diagonal_fisher(model, [x[:5], x[5:]], batch_size=3)
    assert model.training  # evaluated in eval mode, then put back
    for name in whole.names:
        torch.testing.assert_close(whole[name], batched[name])


def test_fisher_accumulates_over_tasks_by_adding(net):
    names = [n for n, _ in net.named_parameters() if n.startswith("pool.")]
    fa = diagonal_fisher(net, images(net, 3, seed=1), names=names, model_kwargs={"task": "a"})
    fb = diagonal_fisher(net, images(net, 2, seed=2), names=names, model_kwargs={"task": "b"})
    total = sum([fa, fb])
    assert total.samples == 5
    for name in names:
        assert torch.equal(total[name], fa[name] + fb[name])
    assert total.normalized().mean_value() == pytest.approx(1.0)


def test_individual_penalty_is_fisher_weighted_squared_distance(net):
    pretrained = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    names = [n for n, _ in net.named_parameters() if not n.startswith("heads.")]
    fisher = diagonal_fisher(pretrained, images(net, 4), names=names, model_kwargs={"task": "a"})
    tau = TaskVector.from_models(pretrained, net, exclude=("heads.",), detach=False)
    penalty = individual_penalty(tau, fisher)
    expected = sum((fisher[n] * tau[n].detach().pow(2)).sum() for n in names)
    torch.testing.assert_close(penalty.detach(), expected)
    penalty.backward()  # the penalty trains the fine-tuned model's parameters
    name = names[0]
    torch.testing.assert_close(net.get_parameter(name).grad, 2 * fisher[name] * tau[name].detach())


def test_ensemble_penalty_is_the_fisher_weighted_spread():
    fisher = FisherDiagonal({"w": torch.tensor([1.0, 2.0, 4.0])}, samples=1)
    a, b = (
        TaskVector({"w": torch.tensor([1.0, 0.0, 2.0])}),
        TaskVector({"w": torch.tensor([3.0, 0.0, 0.0])}),
    )
    # two modules: mean_k (tau_k - mean)^2 = (a - b)^2 / 4
    expected = (fisher["w"] * (a["w"] - b["w"]).pow(2) / 4).sum()
    assert torch.equal(ensemble_penalty([a, b], fisher), expected)
    assert float(ensemble_penalty([a, a, a], fisher)) == 0.0
    assert torch.equal(individual_penalty(a, fisher), (fisher["w"] * a["w"].pow(2)).sum())


def test_fisher_errors_name_the_problem(net):
    x = images(net, 2)
    with pytest.raises(ValueError, match="unknown Fisher mode"):
        diagonal_fisher(net, x, mode="empirical", model_kwargs={"task": "a"})
    with pytest.raises(KeyError, match="no parameter"):
        diagonal_fisher(net, x, names=["nope"], model_kwargs={"task": "a"})
    fisher = FisherDiagonal({"w": torch.ones(2)}, samples=1)
    with pytest.raises(KeyError, match="does not cover"):
        individual_penalty(TaskVector({"v": torch.ones(2)}), fisher)
    with pytest.raises(ValueError, match="at least two modules"):
        ensemble_penalty([TaskVector({"w": torch.ones(2)})], fisher)


def test_a_fisher_diagonal_scales_by_numbers_only():
    fisher = FisherDiagonal({"w": torch.tensor([1.0, 2.0])}, samples=1)
    for scale in (2, 2.0, np.float32(2), torch.tensor(2.0)):
        assert torch.equal((scale * fisher)["w"], torch.tensor([2.0, 4.0]))
        assert torch.equal((fisher * scale)["w"], torch.tensor([2.0, 4.0]))
    for bad in ("x", torch.ones(2)):
        with pytest.raises(TypeError):
            fisher * bad


def test_one_name_string_is_one_parameter(net):
    x = images(net, 2)
    name = "trunk.stem.0.weight"
    one = diagonal_fisher(net, x, names=name, model_kwargs={"task": "a"})
    assert one.names == [name]
    assert torch.equal(
        one[name], diagonal_fisher(net, x, names=[name], model_kwargs={"task": "a"})[name]
    )


def test_a_fisher_diagonal_refuses_non_finite_scales():
    fisher = FisherDiagonal({"w": torch.tensor([1.0, 2.0])}, samples=1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError) as error:
            fisher * bad
        assert str(error.value) == f"a Fisher estimate's scale must be a finite number, got {bad}"
    with pytest.raises(ValueError) as error:
        -1 * fisher
    assert str(error.value) == (
        "a Fisher estimate's scale must be >= 0, got -1: a negative one would make the "
        "penalties reward moving the weights the estimate protects"
    )
    assert torch.equal((0 * fisher)["w"], torch.zeros(2))
    broken = FisherDiagonal({"w": torch.tensor([1.0, math.nan])}, samples=1)
    with pytest.raises(ValueError) as error:
        broken.normalized()
    assert str(error.value) == (
        "the Fisher estimate's mean entry is nan: only one with a finite, positive mean can be "
        "normalized (recompute it)"
    )


def test_penalties_refuse_mismatched_modules_and_fisher_shapes():
    fisher = FisherDiagonal({"w": torch.ones(3), "v": torch.ones(2)}, samples=1)
    full = TaskVector({"w": torch.ones(3), "v": torch.ones(2)})
    part = TaskVector({"w": torch.ones(3)})
    for taus, left, right in (([part, full], [], ["v"]), ([full, part], ["v"], [])):
        with pytest.raises(ValueError) as error:  # the first order dropped "v" silently
            ensemble_penalty(taus, fisher)
        assert str(error.value) == (
            f"task vectors cover different tensors (only in the first: {left}, only in the "
            f"second: {right}): build both from the same pretrained model with the same `exclude`"
        )
    with pytest.raises(ValueError, match="cover different tensors"):
        ensemble_penalty([dict(full.items()), dict(part.items())], fisher)  # mappings too
    with pytest.raises(TypeError, match="got one TaskVector: pass"):
        ensemble_penalty(full, fisher)
    flat = FisherDiagonal({"w": torch.ones(1), "v": torch.ones(2)}, samples=1)
    message = (
        "'w' has shape (3,) in the task vector and (1,) in the Fisher estimate: compute the "
        "Fisher on the model the task vectors come from"
    )
    for call in (
        lambda: individual_penalty(full, flat),
        lambda: ensemble_penalty([full, full], flat),
    ):
        with pytest.raises(ValueError) as error:  # it was broadcast silently
            call()
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        fisher + flat
    assert str(error.value) == (
        "'w' has shape (3,) in one Fisher estimate and (1,) in the other: compute both with the "
        "same model and `names`"
    )


def test_fisher_names_a_bad_batch_size_and_an_unbatched_sample(net):
    x = images(net, 3)
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError) as error:
            diagonal_fisher(net, x, batch_size=size, model_kwargs={"task": "a"})
        assert (
            str(error.value)
            == f"diagonal_fisher needs batch_size to be an integer >= 1, got {size}"
        )
    for inputs in (x[0], [x[0]]):  # one image without its batch dimension
        with pytest.raises(ValueError) as error:
            diagonal_fisher(net, inputs, model_kwargs={"task": "a"})
        assert str(error.value).endswith(f"got {tuple(x[0].shape)}")  # what was passed
    with pytest.raises(ValueError) as error:
        diagonal_fisher(nn.Linear(3, 2), torch.randn(3))
    assert str(error.value) == (
        "the model must return logits [B, C] for a batch of B samples, got (2,) for inputs (3,): "
        "pass a batch [N, ...] (one sample x as x.unsqueeze(0))"
    )


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_bf16_models_fisher_is_the_fp32_one_to_bf16_precision(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model = model.to(torch.bfloat16).float()  # the same weights in both dtypes
    x = torch.randn(10, 5).bfloat16().float()
    expected = diagonal_fisher(model, x, mode=mode, generator=gen(3))
    fisher = diagonal_fisher(model.bfloat16(), x.bfloat16(), mode=mode, generator=gen(3))
    for name in expected.names:
        assert fisher[name].dtype == torch.bfloat16  # the parameters' dtype
        torch.testing.assert_close(fisher[name].float(), expected[name], rtol=0.05, atol=1e-3)


def test_empty_batches_add_nothing_and_no_sample_at_all_is_named(net):
    # a modnet model refuses an empty batch itself, so none may reach it
    x, task, names = images(net, 3), {"task": "a"}, ["heads.a.weight", "heads.a.bias"]
    with_empty = diagonal_fisher(net, [x[:0], x, x[:0]], names=names, model_kwargs=task)
    assert with_empty.samples == 3
    for name, value in diagonal_fisher(net, x, names=names, model_kwargs=task).values.items():
        assert torch.equal(with_empty[name], value)
    with pytest.raises(ValueError, match="no samples to estimate the Fisher from"):
        diagonal_fisher(net, x[:0], names=names, model_kwargs=task)
