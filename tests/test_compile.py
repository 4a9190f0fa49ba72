"""torch.compile runs soft and hard routes, matches eager, and a new route is no recompile."""

import pytest
import torch
import torch._dynamo

from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit


@pytest.mark.slow
def test_compiled_model_matches_eager_for_soft_and_hard_routes():
    torch._dynamo.reset()
    model = moved_off_init(tiny_conv(tasks={"soft": 3, "hard": 3})).eval()
    model.set_route("hard", [2, 0, 0, 1])
    compiled = torch.compile(model, dynamic=False)
    x = images(model)
    with torch.no_grad():
        for task in ("soft", "hard"):
            torch.testing.assert_close(compiled(x, task), model(x, task), rtol=1e-4, atol=1e-5)


def test_swapping_a_hard_route_of_the_same_length_does_not_recompile():
    torch._dynamo.reset()
    model = moved_off_init(tiny_conv(tasks={"t": 3})).eval()
    model.set_route("t", [0, 1, 2, 0])
    compiled = torch.compile(model, backend="eager", dynamic=False)
    x = images(model)
    with torch.no_grad():
        compiled(x, "t")
        model.set_route("t", [2, 2, 1, 0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = compiled(x, "t")
        eager_model = tiny_conv(tasks={"t": 3})
        eager_model.set_route("t", [0, 0, 0, 0])
        eager_model.load_state_dict(model.state_dict())
        torch.testing.assert_close(out, eager_model.eval()(x, "t"), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_training_step_matches_eager_gradients():
    torch._dynamo.reset()
    model = moved_off_init(tiny_conv(tasks={"t": 3})).train()
    reference = tiny_conv(tasks={"t": 3})
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    x, y = images(model), torch.tensor([0, 1, 2, 0])
    torch.nn.functional.cross_entropy(compiled(x, "t"), y).backward()
    torch.nn.functional.cross_entropy(reference.train()(x, "t"), y).backward()
    torch.testing.assert_close(
        model.routes["t"].logits.grad, reference.routes["t"].logits.grad, rtol=1e-4, atol=1e-6
    )


@pytest.mark.slow  # compiles a training step: about 20 s
def test_mixed_task_training_compiles_to_one_graph_without_recompiles():
    torch._dynamo.reset()
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 5, "c": 2})).train()
    reference = tiny_conv(tasks={"a": 3, "b": 5, "c": 2})
    reference.load_state_dict(model.state_dict())
    x, y = images(model, batch=6), torch.tensor([0, 1, 1, 0, 1, 0])
    explained = torch._dynamo.explain(model)(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    model.load_state_dict(reference.state_dict())  # explain ran a training forward
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    torch.nn.functional.cross_entropy(compiled(x, torch.tensor([0, 1, 2, 0, 1, 2])), y).backward()
    reference.train()(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for ids in ([0, 0, 0, 0, 0, 0], [1, 1, 2, 2, 1, 1], [2, 0, 2, 0, 2, 0]):
            ids = torch.tensor(ids)
            out = compiled(x, ids)
            torch.testing.assert_close(out, reference(x, ids), rtol=1e-4, atol=1e-5)
            torch.nn.functional.cross_entropy(out, y).backward()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # six compiles: about 35 s
@pytest.mark.parametrize("route", ["hard", "linear", "hyper"])
@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_mixed_task_forward_has_no_graph_break_for_any_route_kind(build, route):
    torch._dynamo.reset()
    model = moved_off_init(build(tasks={"a": 3, "b": 5, "c": 2}, route=route)).train()
    if route == "hard":
        model.set_route("c", [1, 1, 0])  # a shorter route: a skipped layer
    explained = torch._dynamo.explain(model)(images(model, 6), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert explained.graph_break_count == 0, explained.break_reasons
