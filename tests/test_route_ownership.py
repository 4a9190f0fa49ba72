"""Routes own their state: what a caller hands in is copied, and tasks never share a route.

A property-based test drives random sequences of ``add_task``, ``set_route``, a
per-call route, ``grow``, ``delete_task`` and a save/load round trip over every route kind, and
checks after every step that no other task's output changed, that changing what the
caller handed in changes nothing, and that a saved checkpoint still loads the
outputs it was saved with.
"""

import copy

import pytest
import torch
import torch._dynamo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modnet import io
from modnet.routing import ROUTE_KINDS, HardRoute, SoftRoute
from tests.conftest import images, moved_off_init, tiny_conv

TINY = dict(width=4, exp_ratio=2.0, img_size=8, num_templates=2, depth=3)
GIVEN = ("default", "indices", "index_tensor", "coefficients", "hard_route", "soft_route")


def outputs(model, x):
    with torch.no_grad():
        return {name: model(x, task=name) for name in model.task_names}


def given_route(kind: str, model, draw):
    """A route as a caller would hand it in, and a function that scribbles over it."""
    depth, count = model.depth, model.pool.num_templates
    if kind == "default":
        return None, lambda: None
    if kind in ("indices", "index_tensor", "hard_route"):
        order = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=depth))
        if kind == "indices":
            return order, lambda: order.reverse()
        tensor = torch.tensor(order)
        if kind == "index_tensor":
            return tensor, lambda: tensor.fill_(count - 1 - tensor[0])
        route = HardRoute(tensor, count)
        return route, lambda: route.indices.fill_(0)
    seed = draw(st.integers(0, 2**16))
    coefficients = torch.rand(depth, count, generator=torch.Generator().manual_seed(seed))
    if kind == "coefficients":
        return coefficients, lambda: coefficients.mul_(-3.0)
    route = SoftRoute.from_coefficients(coefficients)
    return route, lambda: route.logits.data.mul_(-3.0)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), route_kind=st.sampled_from(ROUTE_KINDS))
def test_routes_own_their_state_under_any_sequence_of_changes(data, route_kind, tmp_path):
    model = moved_off_init(tiny_conv(**TINY, route=route_kind, tasks={"t0": 2})).eval()
    x = images(model, batch=2)
    saved = []
    counter = 1
    for step in range(data.draw(st.integers(1, 5), label="steps")):
        before = outputs(model, x)
        ops = ["add", "set", "try", "grow", "delete", "save"]
        op = data.draw(st.sampled_from(ops), label="op")
        touched = None
        if op == "add":
            touched = f"t{counter}"
            counter += 1
            kind = data.draw(st.sampled_from(GIVEN), label="given")
            route, scribble = given_route(kind, model, data.draw)
            init_from = data.draw(st.sampled_from([None, *model.task_names]), label="init")
            if route is not None:
                init_from = None
            model.add_task(touched, 3, route=route, init_from=init_from)
            mine = outputs(model, x)[touched]
            scribble()
            assert torch.equal(outputs(model, x)[touched], mine), "the caller's route leaked in"
        elif op == "set" and model.task_names:
            touched = data.draw(st.sampled_from(model.task_names), label="task")
            kind = data.draw(st.sampled_from(GIVEN[1:]), label="given")
            route, scribble = given_route(kind, model, data.draw)
            model.set_route(touched, route)
            mine = outputs(model, x)[touched]
            scribble()
            assert torch.equal(outputs(model, x)[touched], mine), "the caller's route leaked in"
        elif op == "try" and model.task_names:
            task = data.draw(st.sampled_from(model.task_names), label="task")
            kind = data.draw(st.sampled_from(GIVEN[1:]), label="given")
            route, _ = given_route(kind, model, data.draw)
            with torch.no_grad():
                model(x, task=task, route=route)  # a per-call route changes no state
        elif op == "grow":
            touched = data.draw(st.sampled_from([None, *model.task_names]), label="widen")
            model.grow(1, task=touched, init=data.draw(st.sampled_from(["random", 0, "mean"])))
        elif op == "delete" and len(model.task_names) > 1:
            touched = data.draw(st.sampled_from(model.task_names), label="task")
            model.delete_task(touched)
        elif op == "save":
            directory = tmp_path / f"save{len(saved)}-{step}"
            io.save_model(model, directory)
            saved.append((directory, before))
            model, _ = io.load_model(directory)
        after = outputs(model, x)
        for name, value in before.items():
            if name != touched and name in after:
                assert torch.equal(after[name], value), f"{op} on {touched} changed {name}"
    for directory, expected in saved:
        loaded, _ = io.load_model(directory)
        for name, value in outputs(loaded, x).items():
            assert torch.equal(value, expected[name]), f"checkpoint {directory.name}: {name}"


def test_two_tasks_given_the_same_route_object_do_not_share_it():
    model = tiny_conv(tasks={}, route="hard")
    route = HardRoute([0, 1, 2, 0], 3)
    model.add_task("a", 2, route=route)
    model.add_task("b", 2, route=route)
    model.set_route("a", [2, 2, 2, 2])
    assert model.routes["b"].extra_repr() == "indices=[0, 1, 2, 0]"
    assert route.indices.tolist() == [0, 1, 2, 0]
    assert model.routes["a"].indices.data_ptr() != model.routes["b"].indices.data_ptr()


def test_changing_one_task_changes_nothing_a_compiled_model_runs_for_another():
    torch._dynamo.reset()
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 3}, route="hard")).eval()
    compiled = torch.compile(model, backend="eager", dynamic=False)
    x = images(model)
    with torch.no_grad():
        b_before = compiled(x, "b")
        model.set_route("a", [2, 1, 0, 2])
        reference = copy.deepcopy(model)
        assert torch.equal(compiled(x, "b"), b_before)
        torch.testing.assert_close(compiled(x, "a"), reference(x, "a"), rtol=0, atol=0)


@pytest.mark.parametrize("route", ["softmax", "hard", "hyper"])
def test_delete_task_is_the_inverse_of_add_task(route, tmp_path):
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 2}, route=route)).eval()
    x = images(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = outputs(model, x)
    model.add_task("c", 4, init_from="a")
    model.set_normalization("c", [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    model.delete_task("c")
    assert model.task_names == ["a", "b"]
    assert model.task_normalization == {}
    after_state = model.state_dict()
    assert list(after_state) == list(state)
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key
    for name, value in outputs(model, x).items():
        assert torch.equal(value, before[name])
    with pytest.raises(KeyError, match="unknown task 'c'"):
        model.delete_task("c")


def test_route_override_tries_an_order_without_changing_state():
    model = moved_off_init(tiny_conv(tasks={"a": 3}, route="softmax")).eval()
    x = images(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        tried = model(x, task="a", route=[2, 0, 1])
        expected = copy.deepcopy(model)
        expected.set_route("a", [2, 0, 1])
        assert torch.equal(tried, expected(x, task="a"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_route_override_with_coefficients_lets_gradients_reach_them():
    model = moved_off_init(tiny_conv(tasks={"a": 3})).eval()
    coefficients = torch.full((4, 3), 1 / 3, requires_grad=True)
    model(images(model), task="a", route=coefficients).sum().backward()
    assert coefficients.grad is not None and coefficients.grad.abs().sum() > 0
    features = model.forward_features(images(model), task="a", route=coefficients)
    assert features.shape[:2] == (4, model.num_features)


def test_route_override_is_refused_with_per_sample_tasks_and_bad_shapes():
    model = tiny_conv(tasks={"a": 3, "b": 3})
    x = images(model)
    with pytest.raises(ValueError, match="route override applies to one task"):
        model(x, task=["a", "b", "a", "b"], route=[0, 1])
    with pytest.raises(ValueError, match="route coefficients must be"):
        model(x, task="a", route=torch.ones(2, 3))
    with pytest.raises(ValueError, match="out of range"):
        model(x, task="a", route=[0, 7])
    with pytest.raises(ValueError, match="has 2 layers but the model has depth 4"):
        model(x, task="a", route=SoftRoute(2, 3))
