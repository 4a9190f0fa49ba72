"""Tasks that share a layer's weights run it as one batch, equal to each task alone."""

import copy

import pytest
import torch
import torch.nn.functional as F

from modnet import mixed
from modnet.pool import TemplatePool
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit
from tests.test_mixed_batches import per_task

# Six tasks on three hard routes, two tasks each; e and f skip the last layer.
ROUTES = {
    "a": [0, 1, 2, 0],
    "b": [0, 1, 2, 0],
    "c": [2, 2, 1, 0],
    "d": [2, 2, 1, 0],
    "e": [1, 0, 0],
    "f": [1, 0, 0],
}
IDS = torch.tensor([0, 1, 2, 3, 4, 5, 0, 2, 4, 1, 3, 5])  # two samples a task
# Layers 1-3: three templates in use, four samples each; layer 4: template 0 for the
# eight samples of a-d.
SHARED_RUNS = [4] * 9 + [8]


def build(family: str):
    make = tiny_conv if family == "conv" else tiny_vit
    model = moved_off_init(make(tasks=dict.fromkeys(ROUTES, 3), route="hard"))
    for task, route in ROUTES.items():
        model.set_route(task, route)
    return model


@pytest.fixture
def shared_runs(monkeypatch) -> list[int]:
    """The batch size of every ``TemplatePool.run_shared`` call."""
    sizes: list[int] = []
    original = TemplatePool.run_shared
    monkeypatch.setattr(
        TemplatePool,
        "run_shared",
        lambda self, x, *args: sizes.append(x.shape[0]) or original(self, x, *args),
    )
    return sizes


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("family", ["conv", "vit"])
def test_tasks_sharing_templates_run_them_once_as_each_task_alone(family, mode, shared_runs):
    model = build(family)
    reference = copy.deepcopy(model)
    getattr(model, mode)(), getattr(reference, mode)()
    x = images(model, batch=12)
    out = model(x, IDS)
    assert shared_runs == SHARED_RUNS
    for name, (rows, alone) in per_task(reference, x, IDS).items():
        torch.testing.assert_close(out[rows], alone, rtol=0, atol=1e-5, msg=name)
    # running statistics moved per task exactly as when each task ran alone
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_tasks_alone_in_their_chunks_keep_the_single_task_path(shared_runs):
    """Tasks with many samples each already run as single-task batches (the conv
    family's BatchNorm folded): sharing their weights would only unfold it."""
    model = build("conv").eval()
    model.set_route("b", ROUTES["a"])  # a and b share every layer
    x, ids = images(model, batch=32), torch.arange(32) % 2  # 16 samples a task
    with torch.inference_mode():
        out = model(x, ids)
        alone = per_task(model, x, ids)
    assert shared_runs == []
    for name, (rows, logits) in alone.items():
        torch.testing.assert_close(out[rows], logits, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["conv", "vit"])
def test_shared_weight_gradients_equal_the_sum_over_tasks(family, shared_runs):
    model = build(family)
    reference = copy.deepcopy(model)
    x, y = images(model, batch=12), torch.arange(12) % 3
    F.cross_entropy(model(x, IDS), y, reduction="sum").backward()
    assert shared_runs == SHARED_RUNS
    for _name, (rows, logits) in per_task(reference, x, IDS).items():
        F.cross_entropy(logits, y[rows], reduction="sum").backward()
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), key
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=key)


def test_equal_soft_routes_share_their_weights_only_without_autograd(shared_runs):
    """Routes made alike and not trained since mix the same weights; while they
    train, each task's samples must send their gradient to their own route."""
    model = moved_off_init(tiny_vit(tasks=dict.fromkeys("abcd", 3), route="softmax")).eval()
    for task in "bcd":
        model.set_route(task, model.routes["a"])  # a copy: each task keeps its own
    x, ids = images(model, batch=8), torch.arange(8) % 4
    with torch.inference_mode():
        out = model(x, ids)
    assert shared_runs == [8] * model.depth
    shared_runs.clear()
    torch.testing.assert_close(model(x, ids), out, rtol=0, atol=1e-5)
    assert shared_runs == []


def one_hot(routes: list[list[int]]) -> torch.Tensor:
    """Hard routes as coefficients ``[T, L, K=3, G=1]``."""
    return F.one_hot(torch.tensor(routes), 3).float().unsqueeze(-1)


def test_weight_sets_hold_each_layers_distinct_rows_and_every_tasks_place():
    coefficients = one_hot([[0, 1], [0, 1], [2, 1], [2, 1]])
    (first, which0), (second, which1) = mixed.weight_sets(coefficients, None)
    assert torch.equal(first, one_hot([[2, 0]])[0]) and which0.tolist() == [1, 1, 0, 0]
    assert torch.equal(second, one_hot([[1]])[0]) and which1.tolist() == [0, 0, 0, 0]
    active = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    assert mixed.weight_sets(coefficients, active)[1][1].tolist() == [0, 0, 0, -1]


def test_weight_sets_are_none_without_sharing_or_for_trained_coefficients():
    distinct = one_hot([[0, 1], [1, 2], [2, 0], [0, 2]])  # 6 sets for 8 task-layers
    assert mixed.weight_sets(distinct, None) is None
    shared = one_hot([[0, 1], [0, 1], [2, 1], [2, 1]]).requires_grad_()
    assert mixed.weight_sets(shared, None) is None
    assert mixed.weight_sets(one_hot([[0, 1]]), None) is None  # one task: nothing to share
