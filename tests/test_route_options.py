"""Soft-route options: sparsemax, temperature, top-k and straight-through hard forwards."""

import pytest
import torch

from modnet import io
from modnet.errors import ConfigError
from modnet.options import check_model_options
from modnet.routing import SoftRoute, configured_route, route_from_spec, sparsemax
from modnet.train import transfer
from tests.conftest import images, moved_off_init, tiny_conv, tiny_train_config, tiny_vit


def test_sparsemax_is_the_projection_onto_the_simplex():
    z = torch.tensor([[1.0, 0.9, -2.0], [0.0, 0.0, 0.0], [3.0, -1.0, float("-inf")]])
    expected = torch.tensor([[0.55, 0.45, 0.0], [1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(sparsemax(z, dim=1), expected)
    torch.testing.assert_close(sparsemax(z.T, dim=0), expected.T)


def test_sparsemax_leaves_minus_inf_out_and_is_nan_where_softmax_is():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[1.0, -inf, 0.5], [nan, 1.0, 0.0], [inf, 1.0, 0.0], [-inf, -inf, -inf]])
    out = sparsemax(logits, dim=1)
    assert torch.equal(out[0], sparsemax(torch.tensor([1.0, -1e30, 0.5])))
    assert out[0, 1] == 0 and torch.isclose(out[0].sum(), torch.tensor(1.0))
    assert out[1:].isnan().all()  # once silently 0 weight for nan and +inf, a crash for -inf
    assert torch.equal(logits.softmax(1).isnan(), torch.tensor([[False] * 3] + [[True] * 3] * 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparsemax_in_half_precision_is_the_float32_result_rounded(dtype):
    logits = torch.tensor([[1.0, 0.5, float("-inf"), -2.0], [3.0, 2.9, 2.8, -1.0]])
    logits = torch.cat([logits, logits * 1000])  # cumulative sums beyond float16's range
    out = sparsemax(logits.to(dtype))
    assert out.dtype == dtype
    expected = sparsemax(logits.to(dtype).float()).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sparsemax_of_huge_logits_is_the_projection_of_the_shifted_ones(dtype):
    inf = float("inf")
    for scale in (1e7, 3e7, 1e30):
        z = torch.tensor([[scale, scale, 0.0, -inf], [-scale, -inf, -inf, -inf]], dtype=dtype)
        out = sparsemax(z)
        expected = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=dtype)
        assert torch.equal(out, expected), (scale, out)
    # a route at a tiny temperature: rows still on the simplex, the ties split evenly
    route = SoftRoute(2, 4, normalize="sparsemax", temperature=1e-7)
    with torch.no_grad():
        route.logits.copy_(torch.tensor([[2, 2, 0, 1], [3, 0.5, 0, 0]]))
    expected = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(route.coefficients(), expected, rtol=0, atol=0)


def test_sparsemax_gradient_is_centred_on_the_support():
    z = torch.randn(5, 6, dtype=torch.double, generator=torch.Generator().manual_seed(0))
    torch.autograd.gradcheck(lambda t: sparsemax(t, dim=1), (z.requires_grad_(),))
    z = torch.tensor([[1.0, 0.9, -2.0]], requires_grad=True)
    sparsemax(z, dim=1)[0, 0].backward()
    torch.testing.assert_close(z.grad, torch.tensor([[0.5, -0.5, 0.0]]))


def _route(**options):
    route = SoftRoute(4, 3, generator=torch.Generator().manual_seed(0), **options)
    with torch.no_grad():
        route.logits.copy_(torch.tensor([[2, 1, 0], [0, 3, 1], [1, 1.5, 0], [0, -0.5, 2.0]]))
    return route


def test_temperature_divides_the_logits():
    route = _route(temperature=0.25)
    torch.testing.assert_close(route.coefficients(), (route.logits * 4).softmax(dim=1))
    sparse = _route(normalize="sparsemax", temperature=2.0)
    torch.testing.assert_close(sparse.coefficients(), sparsemax(sparse.logits / 2, dim=1))


def test_top_k_keeps_the_largest_logits_and_gives_the_rest_no_gradient():
    route = _route(top_k=2)
    coefficients = route.coefficients()
    kept = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 0], [1, 0, 1]]).bool()
    assert torch.equal(coefficients > 0, kept)
    torch.testing.assert_close(coefficients.sum(1), torch.ones(4))
    torch.testing.assert_close(
        coefficients[0, :2], torch.tensor([2.0, 1.0]).softmax(0), rtol=0, atol=1e-6
    )
    (coefficients * torch.arange(3.0)).sum().backward()
    assert torch.all(route.logits.grad[~kept] == 0) and torch.all(route.logits.grad[kept] != 0)


@pytest.mark.parametrize("normalize", ["softmax", "sparsemax"])
def test_straight_through_runs_one_template_with_the_soft_gradient(normalize):
    hard, soft = _route(normalize=normalize, straight_through="argmax"), _route(normalize=normalize)
    coefficients = hard.coefficients()
    assert torch.equal(coefficients, torch.eye(3)[[0, 1, 1, 2]])
    weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    (coefficients * weights).sum().backward()
    (soft.coefficients() * weights).sum().backward()
    torch.testing.assert_close(hard.logits.grad, soft.logits.grad)


def test_gumbel_routes_sample_one_hot_rows_in_training_and_take_the_argmax_in_eval():
    route = _route(straight_through="gumbel", temperature=4.0)
    torch.manual_seed(0)
    samples = torch.stack([route.coefficients() for _ in range(200)])
    assert torch.equal(samples.sum(-1), torch.ones(200, 4))
    assert torch.equal(samples.max(-1).values, torch.ones(200, 4))
    assert samples[:, 0].mean(0).min() > 0.1  # noise at temperature 4 visits every template
    route.eval()
    assert torch.equal(route.coefficients(), torch.eye(3)[[0, 1, 1, 2]])


def test_a_straight_through_route_runs_exactly_like_the_hard_route():
    for build in (tiny_conv, tiny_vit):
        model = build(tasks={"st": 3, "hard": 3}).eval()
        route = _route(straight_through="argmax")
        model.set_route("st", route)
        model.set_route("hard", [0, 1, 1, 2])
        model.heads["st"].load_state_dict(model.heads["hard"].state_dict())
        x = images(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x, "st"), model(x, "hard"), rtol=0, atol=1e-6)
            mixed = model(torch.cat([x, x]), ["st"] * 4 + ["hard"] * 4)
            torch.testing.assert_close(mixed[:4], model(x, "st"), rtol=0, atol=1e-5)


def test_configured_keeps_the_logits_and_refuses_what_does_not_apply():
    route = _route()
    sharp = configured_route(route, {"temperature": 0.5, "top_k": 2})
    assert torch.equal(sharp.logits, route.logits) and sharp.logits is not route.logits
    assert sharp.options() == {"normalize": "softmax", "temperature": 0.5, "top_k": 2}
    with pytest.raises(ValueError, match="unknown route option 'temp'"):
        route.configured(temp=2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        route.configured(temperature=0)
    with pytest.raises(ValueError, match="top_k must be an integer in 1..3"):
        route.configured(top_k=4)
    with pytest.raises(ValueError, match="not to linear ones"):
        sharp.configured(normalize="linear")
    with pytest.raises(ValueError, match="not to a hard route"):
        configured_route(tiny_conv(route="hard", tasks={"a": 2}).routes["a"], {"top_k": 1})


def test_route_options_are_model_options_and_survive_a_checkpoint(tmp_path):
    options = {"temperature": 0.5, "top_k": 2, "straight_through": "argmax"}
    model = moved_off_init(tiny_conv(route="sparsemax", route_options=options, tasks={"a": 3}))
    model.add_task("b", 3, route=_route(straight_through="gumbel"))
    assert model.routes["a"].options() == {"normalize": "sparsemax", **options}
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m")
    for task in ("a", "b"):
        assert loaded.routes[task].spec() == model.routes[task].spec()
        assert torch.equal(loaded.routes[task].logits, model.routes[task].logits)
    loaded.add_task("c", 3)
    assert loaded.routes["c"].options() == model.routes["a"].options()
    x = images(model)
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, "a"), model(x, "a"))
    old_spec = {"kind": "soft", "shape": [4, 3], "normalize": "softmax", "num_templates": 3}
    assert route_from_spec(old_spec).options() == {"normalize": "softmax"}


def test_bad_route_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="route_options: route temperature must be > 0"):
        check_model_options("modnet_conv_tiny", {"route_options": {"temperature": -1}})
    with pytest.raises(ConfigError, match="need route='softmax' or 'sparsemax'"):
        check_model_options("modnet_conv_tiny", {"route": "hard", "route_options": {"top_k": 1}})
    with pytest.raises(ConfigError, match="must be a dict"):
        check_model_options("modnet_conv_tiny", {"route_options": "hard"})


TINY = dict(depth=4, width=12, exp_ratio=2.0, img_size=16, num_templates=3)


@pytest.mark.slow
def test_transfer_trains_a_route_with_the_options_given(tmp_path):
    from modnet.train import train

    config = tiny_train_config(
        TINY, tasks=["synth_color", "synth_size"], train_limit=96, test_limit=32, epochs=1
    )
    run_dir = tmp_path / "run"
    train(config, run_dir)
    options = {"normalize": "sparsemax", "straight_through": "argmax"}
    with pytest.raises(ConfigError, match="route_options: unknown route option 'tau'"):
        transfer(run_dir, "synth_shape", config=config, route_options={"tau": 1})
    result = transfer(
        run_dir, "synth_color-bg", parts="route", config=config, init_from="synth_color",
        route_options=options,
    )  # fmt: skip
    route, source = result.model.routes["synth_color-bg"], result.model.routes["synth_color"]
    assert route.options() == options
    assert not torch.equal(route.logits, source.logits)
    loaded, _ = io.load_model(run_dir)
    assert loaded.routes["synth_color-bg"].options() == options
