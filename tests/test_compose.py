"""Task vectors and their learned composition (modnet.compose), checked number for number.

Weights and vectors are made of small multiples of powers of two, so sums and
products are exact in float32 and compositions can be compared bit for bit.
"""

import copy
import math

import numpy as np
import pytest
import timm
import torch
from conftest import images, tiny_conv

from modnet.compose import TaskVector, TaskVectorComposer, fit, prediction_entropy


def dyadic_(model: torch.nn.Module, seed: int, step: float = 1 / 8) -> torch.nn.Module:
    """Sets every parameter to small multiples of ``step``: exact float arithmetic."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, generator=generator) * step)
    return model


@pytest.fixture
def family():
    """A pretrained tiny conv net (plain: identity hard route) and three fine-tuned copies."""
    base = dyadic_(tiny_conv(tasks={"a": 5}, num_templates=4, route="hard"), seed=0).eval()
    tuned = [dyadic_(copy.deepcopy(base), seed=s, step=1 / 16) for s in (1, 2, 3)]
    vectors = [TaskVector.from_models(base, t, exclude=("heads.",)) for t in tuned]
    return base, tuned, vectors


# ----------------------------------------------------------------------------- vectors
def test_task_vector_is_the_difference_of_parameters(family):
    base, tuned, (tau, *_) = family
    params, tuned_params = dict(base.named_parameters()), dict(tuned[0].named_parameters())
    assert not any(name.startswith("heads.") for name in tau)
    assert set(tau.names) == {n for n in params if not n.startswith("heads.")}
    for name in tau:
        assert torch.equal(tau[name], tuned_params[name] - params[name])


def test_task_vector_skips_tensors_only_one_model_has(family):
    base, tuned, _ = family
    tuned[0].add_task("b", 3)  # a new head and route exist only in the fine-tuned model
    tau = TaskVector.from_models(base, tuned[0])
    assert "heads.a.weight" in tau and "heads.b.weight" not in tau


def test_task_vector_arithmetic(family):
    _, _, (a, b, c) = family
    name = a.names[0]
    assert torch.equal((a + b)[name], a[name] + b[name])
    assert torch.equal((a - b)[name], a[name] - b[name])
    assert torch.equal((-a)[name], -a[name])
    assert torch.equal((2 * a)[name], (a * 2)[name])
    assert torch.equal((a / 2)[name], a[name] * 0.5)
    with pytest.raises(ZeroDivisionError, match="task vector divided by zero"):
        a / 0  # as for numbers, not a vector of inf and nan
    assert torch.equal(sum([a, b, c])[name], a[name] + b[name] + c[name])
    assert torch.equal(TaskVector.mean([a, b])[name], (a[name] + b[name]) / 2)
    assert (a - a).norm() == 0.0
    assert a.cosine(a) == pytest.approx(1.0)
    assert a.cosine(-a) == pytest.approx(-1.0)


def test_numpy_scalars_scale_a_vector_as_python_numbers_do(family):
    _, _, (a, b, _) = family

    def same(left, right):
        return left.names == right.names and all(torch.equal(left[n], right[n]) for n in left)

    for value in (0.5, 0.1, 3.0):
        for scalar in (np.float64(value), np.float32(value), np.float16(value)):
            python = float(scalar)
            assert same(scalar * a, python * a) and same(a * scalar, a * python)
            assert same(a / scalar, a / python)
    assert same(np.int64(2) * a, 2 * a) and same(a * np.int32(2), a * 2)
    assert same(np.float64(0) + a, a)  # a sum started at a NumPy zero
    # a sweep over np.linspace: interpolating from a to b
    sweep = [(1 - lam) * a + lam * b for lam in np.linspace(0, 1, 5)]
    assert same(sweep[0], a) and same(sweep[-1], b)
    assert same(sweep[2], 0.5 * a + 0.5 * b)
    # one-element tensors and arrays (a learned or swept coefficient) too
    for scalar in (torch.tensor(0.5), torch.tensor([0.5]), np.array(0.5)):
        assert same(scalar * a, 0.5 * a) and same(a * scalar, 0.5 * a)
        assert same(a / scalar, a / 0.5)
    for bad in (np.ones(3), torch.ones(3), "x"):
        with pytest.raises(TypeError):
            bad * a  # no scale: refused, not spread over elements or repeated
        with pytest.raises(TypeError):
            a * bad


def test_apply_and_run_reach_the_fine_tuned_model(family):
    base, tuned, _ = family
    tau = TaskVector.from_models(base, tuned[0])  # heads included
    x = images(base, 3)
    with torch.no_grad():
        expected = tuned[0](x, task="a")
        functional = tau.run(base, x, task="a")
        applied = tau.apply(copy.deepcopy(base))(x, task="a")
    assert torch.equal(functional, expected)
    assert torch.equal(applied, expected)
    assert (tuned[0].get_parameter(tau.names[0]) - base.get_parameter(tau.names[0])).abs().sum() > 0
    assert torch.equal(tau.run(base, x, task="a"), expected)  # run left the model as it was


def test_vectors_of_different_models_do_not_mix(family):
    base, _, (tau, *_) = family
    other = TaskVector.from_models(base, base, exclude=("heads.", "trunk."))
    with pytest.raises(ValueError, match="same pretrained model"):
        tau + other
    with pytest.raises(KeyError, match="architecture it was made from"):
        tau.apply(timm.create_model("test_vit", num_classes=5))


def test_mismatched_shapes_name_the_tensor(family):
    base, tuned, _ = family
    tuned[0].reset_classifier(7, task="a")
    with pytest.raises(ValueError, match="heads.a.weight"):
        TaskVector.from_models(base, tuned[0])


# ---------------------------------------------------------------------------- composer
def test_composed_weights_are_base_plus_weighted_vectors(family):
    base, _, vectors = family
    composer = TaskVectorComposer(base, vectors, anisotropic=True)
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-4, 5, composer.coefficients.shape, generator=generator) / 4
    composer.set_coefficients(values)
    weights = composer.composed_weights()
    params = dict(base.named_parameters())
    for name in composer.tensor_names:
        start, rows = composer._layout[name]
        c = values[:, start : start + rows]  # [K, rows]
        expected = params[name].clone()
        for k, tau in enumerate(vectors):
            if rows == 1:
                expected += c[k, 0] * tau[name]
            else:
                expected += c[k].view(-1, *[1] * (tau[name].ndim - 1)) * tau[name]
        assert torch.equal(weights[name], expected), name


def test_template_pools_get_one_coefficient_per_template(family):
    base, _, vectors = family
    composer = TaskVectorComposer(base, vectors)
    pool_tensors = len(base.pool.tensor_names)
    trunk_tensors = sum(1 for n in vectors[0] if n.startswith("trunk."))
    assert composer.num_groups == base.pool.num_templates * pool_tensors + trunk_tensors
    coarse = TaskVectorComposer(base, vectors, per_template=False)
    assert coarse.num_groups == pool_tensors + trunk_tensors


def test_an_exported_network_gets_one_coefficient_per_block():
    base = tiny_conv(tasks={"a": 3}, num_templates=3, depth=4, route="linear")
    plain = base.export("a")  # four blocks from three templates: the counts differ
    tau = TaskVector.from_models(plain, dyadic_(copy.deepcopy(plain), seed=1), exclude="head.")
    trunk, per_block = sum(n.startswith("trunk.") for n in tau), len(base.pool.tensor_names)
    assert TaskVectorComposer(plain, [tau]).num_groups == 4 * per_block + trunk
    modular = TaskVector.zeros_like(base, exclude=("heads.", "routes."))
    assert TaskVectorComposer(base, [modular]).num_groups == 3 * per_block + trunk


def test_isotropic_equals_anisotropic_with_tied_coefficients(family):
    base, _, vectors = family
    x = images(base, 3)
    iso = TaskVectorComposer(base, vectors, anisotropic=False, init=torch.tensor([0.5, -1.0, 2.0]))
    aniso = TaskVectorComposer(base, vectors, anisotropic=True)
    aniso.set_coefficients(torch.tensor([0.5, -1.0, 2.0])[:, None].expand(3, aniso.num_groups))
    assert iso.coefficients.shape == (3,)
    for name, value in iso.composed_weights().items():
        assert torch.equal(value, aniso.composed_weights()[name])
    with torch.no_grad():
        assert torch.equal(iso(x, task="a"), aniso(x, task="a"))


def test_zero_coefficients_give_the_base_model_bit_for_bit(family):
    base, _, vectors = family
    x = images(base, 4)
    with torch.no_grad():
        expected = base(x, task="a")
    composer = TaskVectorComposer(base, vectors)
    with torch.no_grad():
        weights = composer.composed_weights()
        assert all(weights[n] is base.get_parameter(n) for n in weights)  # nothing computed
        assert torch.equal(composer(x, task="a"), expected)


def test_zero_coefficients_skip_their_vectors(family):
    base, _, vectors = family
    nan = TaskVector({n: torch.full_like(t, math.nan) for n, t in vectors[1].items()})
    poisoned = [vectors[0], nan, vectors[2]]
    composer = TaskVectorComposer(
        base, poisoned, anisotropic=False, init=torch.tensor([0.5, 0.0, 0.5])
    )
    reference = TaskVector.mean([vectors[0], vectors[2]]).apply(copy.deepcopy(base))
    x = images(base, 3)
    with torch.no_grad():
        assert torch.equal(composer(x, task="a"), reference(x, task="a"))


def test_unlearning_by_removal_is_the_average_of_the_rest(family):
    base, _, vectors = family
    composer = TaskVectorComposer(base, vectors, anisotropic=False, init=1 / 2)
    composer.set_coefficients([0.5, 0.0, 0.5])  # module 1 removed from a two-module average
    merged = composer.merged()
    expected = TaskVector.mean([vectors[0], vectors[2]]).apply(copy.deepcopy(base))
    for (name, value), (other, reference) in zip(
        merged.named_parameters(), expected.named_parameters(), strict=True
    ):
        assert name == other and torch.equal(value, reference), name


def test_only_coefficients_learn(family):
    base, _, vectors = family
    base.heads["a"].requires_grad_(True)
    composer = TaskVectorComposer(base, vectors, freeze=True)
    assert not base.heads["a"].weight.requires_grad  # freeze covers the whole model
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    x, y = images(base, 8), torch.arange(8) % 5
    losses = fit(
        lambda step: torch.nn.functional.cross_entropy(composer(x, task="a"), y),
        [composer.coefficients],
        steps=5,
        lr=0.05,
    )
    assert composer.coefficients.abs().sum() > 0  # zero init still receives gradients
    assert losses[-1] < losses[0]
    for name, p in base.named_parameters():
        assert torch.equal(p, frozen[name]), name


def test_composer_runs_a_timm_model():
    model = timm.create_model("test_vit", num_classes=4, img_size=32).eval()
    tuned = [dyadic_(copy.deepcopy(model), seed=s, step=1 / 64) for s in (1, 2)]
    vectors = {f"t{i}": TaskVector.from_models(model, t) for i, t in enumerate(tuned)}
    composer = TaskVectorComposer(model, vectors, anisotropic=True, init=1.0)
    assert composer.vector_names == ["t0", "t1"]
    assert composer.num_groups == len(vectors["t0"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        composed = composer(x)
        expected = (vectors["t0"] + vectors["t1"]).apply(copy.deepcopy(model))(x)
    torch.testing.assert_close(composed, expected, rtol=1e-4, atol=1e-5)


def test_coefficient_shapes_are_checked(family):
    base, _, vectors = family
    composer = TaskVectorComposer(base, vectors, anisotropic=False)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        composer.set_coefficients(torch.zeros(2))
    with pytest.raises(ValueError, match="init must be"):
        TaskVectorComposer(base, vectors, init=torch.zeros(5))


def test_prediction_entropy_and_its_balance_term():
    uniform = torch.zeros(4, 5)
    assert float(prediction_entropy(uniform)) == pytest.approx(math.log(5))
    collapsed = torch.tensor([[20.0, 0, 0], [20.0, 0, 0]])  # confident, always class 0
    spread = torch.tensor([[20.0, 0, 0], [0, 20.0, 0]])  # confident, two classes
    assert float(prediction_entropy(collapsed)) == pytest.approx(float(prediction_entropy(spread)))
    # the balance term subtracts the entropy of the mean prediction: spreading wins
    assert float(prediction_entropy(spread, balance=1.0)) == pytest.approx(-math.log(2), abs=1e-6)
    assert float(prediction_entropy(collapsed, balance=1.0)) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------- fit
@pytest.mark.parametrize("bad", ["loss", "gradient"])
def test_fit_stops_before_a_non_finite_step(bad):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    seen = {}

    def loss(step):
        seen[step] = (a.detach().clone(), b.detach().clone())
        if step == 2 and bad == "loss":
            return (a * float("nan")).sum() + b.sum()
        if step == 2:  # a finite loss whose gradient is not: sqrt at 0
            return (a * 0).sqrt().sum() + b.sum()
        return a.pow(2).sum() + b.pow(2).sum()

    what = "the loss became nan" if bad == "loss" else "a gradient became NaN or infinite"
    message = (
        f"{what} at step 2; that step was not taken, so the parameters are as after the last "
        "good one: lower the lr (now 0.01) or check loss_fn"
    )
    with pytest.raises(FloatingPointError) as error:
        fit(loss, [a, b], steps=5)  # clipping would spread one NaN gradient to every parameter
    assert str(error.value) == message
    assert torch.equal(a.detach(), seen[2][0]) and torch.equal(b.detach(), seen[2][1])
    assert not torch.equal(seen[2][0], torch.ones(3))  # two good steps were taken


def test_fit_arguments_are_checked_before_training():
    p = torch.nn.Parameter(torch.ones(2))

    def loss(step):
        return p.pow(2).sum()

    cases = [
        (dict(steps=2.5), ValueError, "fit needs steps to be an integer >= 1, got 2.5"),
        (dict(warmup=2.0), ValueError, "fit needs warmup to be a finite number in [0, 1], got 2.0"),
        (dict(warmup=-1), ValueError, "fit needs warmup to be a finite number in [0, 1], got -1"),
        (dict(lr=-0.1), ValueError, "fit needs lr to be a finite number >= 0, got -0.1"),
        (dict(lr=math.nan), ValueError, "fit needs lr to be a finite number >= 0, got nan"),
        (dict(grad_clip=-1), ValueError, "fit needs grad_clip to be a finite number >= 0, got -1"),
        (dict(params=[]), ValueError, "fit got no parameters to fit: pass a non-empty list"),
        (
            dict(params=p),
            TypeError,
            "fit takes a list of parameters, got a Parameter: pass [p] or module.parameters()",
        ),
        (
            dict(params=[{"params": [p], "lr": -1.0}]),
            ValueError,
            "fit needs lr to be a finite number >= 0, got -1.0",
        ),
        (
            dict(loss_fn=lambda step: p.pow(2)),
            TypeError,
            "loss_fn must return a one-element tensor, got (2,)",
        ),
    ]
    for options, kind, message in cases:
        with pytest.raises(kind) as error:
            fit(**{"loss_fn": loss, "params": [p], "steps": 3, **options})
        assert str(error.value) == message
        assert torch.equal(p.detach(), torch.ones(2)), options  # nothing was trained
    assert fit(loss, [p], steps=2, grad_clip=0)[0] == 2.0  # 0: no clipping
    assert len(fit(loss, [p], steps=2, lr=np.float32(0.1))) == 2  # a NumPy number is a number


def test_a_refused_composer_leaves_the_model_trainable(family):
    base, _, vectors = family
    base.requires_grad_(True)
    for init, kind in ((torch.zeros(5), ValueError), ("0.5", TypeError)):
        with pytest.raises(kind, match="init must be a number or a tensor of shape"):
            TaskVectorComposer(base, vectors, init=init)
        assert all(p.requires_grad for p in base.parameters())  # not frozen by a refusal
    with pytest.raises(TypeError) as error:
        TaskVectorComposer(base, vectors, anisotropic=False, init="0.5")
    assert str(error.value) == (
        "init must be a number or a tensor of shape (3,) ([vectors]), got str '0.5'"
    )


def test_one_vector_where_a_list_is_expected_is_refused(family):
    base, _, (tau, *_) = family
    for call, what in (
        (lambda: TaskVectorComposer(base, tau), "TaskVectorComposer"),
        (lambda: TaskVector.mean(tau), "TaskVector.mean"),
    ):
        with pytest.raises(TypeError) as error:
            call()
        assert (
            str(error.value)
            == f"{what} takes a list of task vectors, got one TaskVector: pass [tau]"
        )
    with pytest.raises(TypeError, match="takes task vectors, got a dict"):
        TaskVector.mean([tau, dict(tau.items())])


def test_composer_coefficients_accept_numpy_and_tensor_scalars(family):
    base, _, vectors = family
    for init in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5), torch.tensor([0.5])):
        composer = TaskVectorComposer(base, vectors, init=init)
        assert torch.equal(composer.coefficients, torch.full((3, composer.num_groups), 0.5))
        composer.set_coefficients(np.float32(0.25))
        assert torch.equal(composer.coefficients, torch.full((3, composer.num_groups), 0.25))


def test_one_exclude_string_is_one_prefix():
    model = torch.nn.ModuleDict({k: torch.nn.Linear(2, 2) for k in ("trunk", "routes", "heads")})
    tuned = copy.deepcopy(model)
    kept = ["routes.weight", "routes.bias", "heads.weight", "heads.bias"]  # "r" is in "trunk."
    assert TaskVector.from_models(model, tuned, exclude="trunk.").names == kept
    assert TaskVector.from_models(model, tuned, exclude=("trunk.",)).names == kept
    assert TaskVector.zeros_like(model, exclude="trunk.").names == kept


@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, -math.inf, np.float32("nan"), torch.tensor(math.inf)]
)
def test_non_finite_scales_are_refused_before_anything_is_written(family, bad):
    base, _, (a, b, _) = family
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    composer = TaskVectorComposer(base, [a, b], anisotropic=False, init=0.5)
    text = str(float(bad))
    cases = [
        (lambda: a.apply(base, scale=bad), f"scale must be a finite number, got {text}"),
        (lambda: a.weights(base, scale=bad), f"scale must be a finite number, got {text}"),
        (lambda: a * bad, f"a task vector's scale must be a finite number, got {text}"),
        (lambda: bad * a, f"a task vector's scale must be a finite number, got {text}"),
        (lambda: a / bad, f"a task vector's divisor must be a finite number, got {text}"),
        (
            lambda: TaskVector.mean([a, b], weights=[bad, 1.0]),
            f"a weight of TaskVector.mean must be a finite number, got {text}",
        ),
        (
            lambda: TaskVectorComposer(base, [a, b], init=bad),
            f"init must be a finite number, got {text}",
        ),
        (
            lambda: composer.set_coefficients(bad),
            f"coefficients must be a finite number, got {text}",
        ),
        (
            lambda: composer.set_coefficients([0.5, float(bad)]),
            f"coefficients must be finite, got NaN or infinite entries: [0.5, {text}]",
        ),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as error:
            call()
        assert str(error.value) == message
    assert torch.equal(composer.coefficients, torch.tensor([0.5, 0.5]))
    for name, p in base.named_parameters():
        assert torch.equal(p, before[name]), name
    with pytest.raises(TypeError) as error:
        a.apply(base, scale="0.5")
    assert str(error.value) == "scale must be a real number, got str '0.5'"
    # a learned scale keeps its gradient through weights()
    scale = torch.tensor(0.5, requires_grad=True)
    name = a.names[0]
    a.weights(base, scale=scale)[name].sum().backward()
    assert scale.grad == a[name].sum()


def test_state_dicts_with_running_statistics_are_refused(family):
    base, tuned, _ = family
    with pytest.raises(ValueError) as error:  # a state_dict() holds BatchNorm's buffers
        TaskVector.from_state_dicts(base.state_dict(), tuned[0].state_dict())
    assert str(error.value) == (
        "'trunk.stem.1.running_mean' is a BatchNorm running statistic, not a weight: pass "
        "parameters only, e.g. dict(model.named_parameters()), or use TaskVector.from_models"
    )
    params = TaskVector.from_state_dicts(
        dict(base.named_parameters()), dict(tuned[0].named_parameters())
    )
    assert params.names == TaskVector.from_models(base, tuned[0]).names
    buffer = TaskVector({"trunk.stem.1.running_mean": torch.ones(8)})
    with pytest.raises(KeyError) as error:  # it blamed the architecture
        buffer.apply(base)
    assert error.value.args[0] == (
        "['trunk.stem.1.running_mean'] are buffers of the model, not parameters: a task vector "
        "covers parameters only; build it with TaskVector.from_models"
    )
