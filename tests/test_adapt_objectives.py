"""Pseudo-labelling, sliced Wasserstein, anisotropic and averaged target routes, the diagnosis.

Tiny models and hand-made tensors: every test runs in well under a second.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modnet.adapt import (
    AdaptationError,
    add_target_task,
    average_route,
    diagnose_objectives,
    make_objective,
)
from modnet.adapt.objectives import sliced_wasserstein
from modnet.data import TaskData
from modnet.routing import SoftRoute
from tests.conftest import moved_off_init, tiny_conv

SOURCES = ["a", "b"]


def test_pseudo_labelling_is_cross_entropy_on_confident_predictions_only():
    objective = make_objective("pseudo_label", 8, 2, threshold=0.9)
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 9.0]], requires_grad=True)
    loss = objective.loss({}, torch.zeros(3, 8), logits)
    confident = F.cross_entropy(logits[[0, 2]], torch.tensor([0, 2]), reduction="sum")
    assert loss.item() == pytest.approx(confident.item() / 3)
    loss.backward()
    assert torch.equal(logits.grad[1], torch.zeros(3))  # not confident: no pull
    assert logits.grad[0, 0] < 0  # the confident class is made more confident
    everything = make_objective("pseudo_label", 8, 2, threshold=0.0).loss({}, None, logits)
    expected = F.cross_entropy(logits, logits.argmax(-1))
    assert everything.item() == pytest.approx(expected.item())
    with pytest.raises(AdaptationError, match="threshold must be in"):
        make_objective("pseudo_label", 8, 2, threshold=1.0)


def test_sliced_wasserstein_of_a_shifted_sample_is_the_squared_projected_shift():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 6, generator=generator)
    shift = torch.randn(6, generator=generator)
    directions = F.normalize(torch.randn(6, 7, generator=generator), dim=0)
    expected = (shift @ directions).pow(2).mean()
    assert sliced_wasserstein(a, a + shift, directions).item() == pytest.approx(expected.item())
    permuted = a[torch.randperm(50, generator=generator)]
    assert sliced_wasserstein(a, permuted, directions).item() == pytest.approx(0.0, abs=1e-12)
    half = sliced_wasserstein(a, a[::2] + shift, directions)  # samples of different sizes
    assert half.item() > 0


def test_sliced_wasserstein_objective_pulls_the_target_towards_the_sources():
    objective = make_objective("sliced_wasserstein", 4, 2, projections=16)
    source = torch.randn(40, 4)
    target = (source + 3.0).requires_grad_(True)
    loss = objective.loss({"a": source, "b": source}, target, None)
    assert loss.item() > 1.0
    loss.backward()
    assert (target.grad.sum(0) > 0).all()  # descending moves every feature down, to the source
    assert objective.loss({"a": source}, source.clone(), None).item() == pytest.approx(0.0)
    with pytest.raises(AdaptationError, match="projections must be at least 1"):
        make_objective("sliced_wasserstein", 4, 2, projections=0)


def _model():
    model = moved_off_init(tiny_conv())
    for name in SOURCES:
        model.add_task(name, 3)
    with torch.no_grad():  # distinct source routes
        model.routes["a"].logits.normal_(0, 2, generator=torch.Generator().manual_seed(1))
        model.routes["b"].logits.normal_(0, 2, generator=torch.Generator().manual_seed(2))
    return model.eval()


def test_an_anisotropic_target_route_starts_as_the_same_mixture():
    model = _model()
    x = torch.randn(5, 3, 8, 8)
    add_target_task(model, "t", 3, SOURCES)
    add_target_task(model, "u", 3, SOURCES, anisotropic=True)
    assert model.routes["u"].logits.shape == (4, 3, model.pool.num_tensors)
    assert model.routes["u"].logits.requires_grad
    torch.testing.assert_close(model(x, task="u"), model(x, task="t"))
    assert model.routes["u"].logits.numel() == model.routes["t"].logits.numel() * (
        model.pool.num_tensors
    )


def _with_anisotropic(model, name: str = "c", normalize: str = "softmax", seed: int = 3):
    """Adds a source ``name`` whose route has one random coefficient per block tensor."""
    tensors = model.pool.num_tensors
    generator = torch.Generator().manual_seed(seed)
    route = SoftRoute(4, 3, tensors, normalize, init="uniform")
    with torch.no_grad():
        route.logits.copy_(torch.randn(4, 3, tensors, generator=generator))
    model.add_task(name, 3, route=route)
    return model


def test_isotropic_and_anisotropic_sources_average_their_template_shares():
    model = _with_anisotropic(_model())
    shares = {s: model.routes[s].coefficients().detach() for s in ("a", "b", "c")}
    assert shares["a"].shape == (4, 3) and shares["c"].shape == (4, 3, model.pool.num_tensors)
    # an isotropic target: the anisotropic source counts its mean share over the tensors
    expected = (shares["a"] + shares["b"] + shares["c"].mean(-1)) / 3
    route = average_route(model, ["a", "b", "c"])
    assert route.logits.shape == (4, 3)
    torch.testing.assert_close(route.coefficients(), expected)
    torch.testing.assert_close(route.coefficients().sum(1), torch.ones(4))
    # an anisotropic target: every tensor of an isotropic source counts the layer's share
    expected = (shares["a"].unsqueeze(-1) + shares["c"]) / 2
    route = average_route(model, ["a", "c"], anisotropic=True)
    assert route.logits.shape == (4, 3, model.pool.num_tensors)
    torch.testing.assert_close(route.coefficients(), expected)
    # every source anisotropic: the average stays anisotropic, as before
    _with_anisotropic(model, "d", seed=4)
    both = (shares["c"] + model.routes["d"].coefficients().detach()) / 2
    torch.testing.assert_close(average_route(model, ["c", "d"]).coefficients(), both)
    # the target task is added and runs
    add_target_task(model, "t", 3, ["a", "c"])
    add_target_task(model, "u", 3, ["a", "c"], anisotropic=True)
    x = torch.randn(2, 3, 8, 8)
    assert model(x, task="t").shape == model(x, task="u").shape == (2, 3)


def test_linear_sources_of_both_shapes_average_their_coefficients():
    model = tiny_conv(tasks={"a": 3}, route="linear")
    with torch.no_grad():
        model.routes["a"].logits.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    _with_anisotropic(model, "c", normalize="linear")
    a, c = model.routes["a"].logits.detach(), model.routes["c"].logits.detach()
    route = average_route(model, ["a", "c"])
    assert route.normalize == "linear"
    torch.testing.assert_close(route.coefficients(), (a + c.mean(-1)) / 2)
    route = average_route(model, ["a", "c"], anisotropic=True)
    torch.testing.assert_close(route.coefficients(), (a.unsqueeze(-1) + c) / 2)


def test_hard_and_soft_sources_average_their_shares_and_other_mixes_are_refused():
    model = _with_anisotropic(_model())
    model.add_task("h", 3, route=[0, 2, 1, 0])
    one_hot = F.one_hot(torch.tensor([0, 2, 1, 0]), 3).float()
    shares = model.routes["a"].coefficients().detach()
    aniso = model.routes["c"].coefficients().detach().mean(-1)
    route = average_route(model, ["a", "h", "c"])
    torch.testing.assert_close(route.coefficients(), (shares + one_hot + aniso) / 3)
    model.add_task("l", 3, route=torch.full((4, 3), 0.5))  # a linear route
    with pytest.raises(
        AdaptationError, match=r"kinds \['linear', 'softmax'\].*--init SOURCE.*--sources"
    ):
        average_route(model, ["a", "l"])
    hyper = tiny_conv(tasks={"a": 3}, route="hyper")
    hyper.add_task("s", 3, route=SoftRoute(4, 3))
    with pytest.raises(AdaptationError, match=r"kinds \['hyper', 'softmax'\].*--init SOURCE"):
        add_target_task(hyper, "t", 3, ["a", "s"])


def _data(name: str, seed: int, shift: float = 0.0) -> TaskData:
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(64, 3, 8, 8, generator=generator) * 120 + shift).to(torch.uint8)
    y = torch.randint(0, 3, (64,), generator=generator)
    return TaskData(name, 3, x, y, x[:16], y[:16], dict(mean=[0.3] * 3, std=[0.2] * 3))


def test_diagnosis_measures_the_gradient_and_where_each_objective_is_lowest():
    model = _model()
    sources = {"a": _data("a", 0), "b": _data("b", 1, shift=100)}
    target = _data("t", 2, shift=60)
    add_target_task(model, "t", 3, SOURCES, init="a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["moments", "entropy", "norm_stats", "adversarial", "sliced_wasserstein"]
    report = diagnose_objectives(model, "t", sources, target, names, 0.03, sample=32, start="a")
    assert model.task_names == [*SOURCES, "t"]  # the probes are gone, nothing changed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(report["objectives"]) == {"moments", "entropy", "adversarial", "sliced_wasserstein"}
    route = model.routes["t"].logits
    assert report["route"]["logit_norm"] == pytest.approx(float(route.detach().norm()))
    shares = route.detach().softmax(1)
    assert report["route"]["saturation"] == pytest.approx(float(shares.max(1).values.mean()))
    moments = report["objectives"]["moments"]
    # The same gradient, computed by hand on the same batches.
    x = target.normalize(target.train_x[torch.randperm(64, generator=_gen(0))[:32]])
    feats = {
        s: model.forward_head(model.forward_features(d.normalize(d.train_x[idx]), s), s, True)
        for i, (s, d) in enumerate(sources.items())
        for idx in [torch.randperm(64, generator=_gen(1 + i))[:32]]
    }
    route.requires_grad_(True)
    f = model.forward_head(model.forward_features(x, "t"), "t", pre_logits=True)
    loss = make_objective("moments", model.num_features, 2).loss(
        {k: v.detach() for k, v in feats.items()}, f, None
    )
    (grad,) = torch.autograd.grad(loss, route)
    assert moments["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert moments["grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-4)
    assert moments["sgd_step"] == pytest.approx(0.03 * moments["grad_norm"])
    assert moments["adam_steps_to_move"] == pytest.approx(
        route.detach().norm().item() / (0.03 * math.sqrt(route.numel())), rel=1e-5
    )
    for item in report["objectives"].values():
        values = item["values"]
        assert values["start"] == pytest.approx(values["a"], rel=1e-5)  # started at a
        assert set(values) == {"start", "a", "b", "average"}
        lowest = min(values["b"], values["average"])
        assert item["prefers_start"] == (values["start"] <= lowest + 1e-9)
        expected = "a" if item["prefers_start"] else min(("b", "average"), key=values.get)
        assert item["best_start"] == expected
    assert report["objectives"]["adversarial"]["grad_norm"] > 0  # taken at full reversal


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_an_unknown_objective_option_names_the_options_the_objective_takes():
    with pytest.raises(
        AdaptationError,
        match=r"^unknown option 'thresh' for the 'pseudo_label' objective \(did you mean "
        r"threshold\?\): it takes threshold$",
    ):
        make_objective("pseudo_label", 8, 2, thresh=0.9)
    with pytest.raises(AdaptationError, match="'norm_stats' objective: it takes none$"):
        make_objective("norm_stats", 8, 2, threshold=0.9)
    assert make_objective("pseudo_label", 8, 2, threshold=0.5).threshold == 0.5
