"""Tasks are isolated: gradients, statistics and outputs of other tasks never move."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit

ROUTE_KINDS = ["softmax", "linear", "hyper", "hard"]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("route", ["softmax", "linear", "hyper"])
def test_gradients_reach_the_task_in_the_batch_and_nothing_else(route):
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 4}, route=route))
    x, y = images(model), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x, "a"), y).backward()
    for p in model.pool.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in model.routes["a"].parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in list(model.routes["b"].parameters()) + list(model.heads["b"].parameters()):
        assert p.grad is None
    assert model.heads["a"].weight.grad.abs().sum() > 0


def test_hard_route_sends_gradients_only_to_the_templates_it_uses():
    model = moved_off_init(tiny_conv(tasks={"a": 3}))
    model.set_route("a", [2, 2, 0])
    F.cross_entropy(model(images(model), "a"), torch.tensor([0, 1, 2, 0])).backward()
    grads = model.pool.chunks[0].tensor("conv_pw.weight").grad
    assert grads[0].abs().sum() > 0 and grads[2].abs().sum() > 0
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_training_updates_only_the_running_statistics_of_its_task():
    model = tiny_conv(tasks={"a": 3, "b": 3}).train()
    before_b = {k: v.clone() for k, v in model.norm_stats["b"].state_dict().items()}
    before_a = {k: v.clone() for k, v in model.norm_stats["a"].state_dict().items()}
    model(images(model), "a")
    for key, value in model.norm_stats["b"].state_dict().items():
        assert torch.equal(value, before_b[key]), key
    changed = [
        k for k, v in model.norm_stats["a"].state_dict().items() if not torch.equal(v, before_a[k])
    ]
    assert len(changed) == len(before_a)  # every layer's and the trunk's statistics moved


def test_eval_mode_leaves_running_statistics_alone():
    model = tiny_conv(tasks={"a": 3}).eval()
    before = snapshot(model)
    model(images(model), "a")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("route", ROUTE_KINDS)
@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_adding_a_task_and_growing_the_pool_leave_old_tasks_bit_identical(build, route):
    model = build(tasks={"a": 3, "b": 5}, route=route).eval()
    x = images(model)
    with torch.no_grad():
        before = {t: model(x, t) for t in ("a", "b")}
    model.add_task("c", 4)
    model.grow(2, task="c")
    model.add_task("d", 2, init_from="a")
    model.grow(1, task="b" if route == "hard" else "d", init="mean")
    assert model.pool.num_templates == 6
    with torch.no_grad():
        for task, expected in before.items():
            if task == "b" and route == "hard":
                continue
            assert torch.equal(model(x, task), expected), task
        # the new task can use the new templates and produces finite outputs
        assert torch.isfinite(model(x, "c")).all()


def test_grown_templates_train_only_for_the_task_that_can_see_them():
    model = moved_off_init(tiny_conv(tasks={"old": 3}))
    model.add_task("new", 3)
    new = model.grow(2, task="new")
    assert list(new) == [3, 4]
    for p in model.pool.chunks[0].parameters():
        p.requires_grad_(False)
    F.cross_entropy(model(images(model), "old"), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is None for p in model.pool.chunks[1].parameters())
    F.cross_entropy(model(images(model), "new"), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.pool.chunks[1].parameters())
    assert all(p.grad is None for p in model.pool.chunks[0].parameters())


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_mixed_task_batch_equals_running_each_task_separately(build):
    model = build(tasks={"a": 3, "b": 5, "c": 2}).eval()
    model.set_route("c", [1, 1, 0])
    x = images(model, batch=7)
    task_ids = torch.tensor([1, 0, 2, 1, 1, 0, 2])
    with torch.no_grad():
        mixed = model(x, task_ids)
        assert mixed.shape == (7, 5)
        for t, name in enumerate(model.task_names):
            rows = (task_ids == t).nonzero().flatten()
            alone = model(x[rows], name)
            classes = model.task_classes[name]
            torch.testing.assert_close(mixed[rows, :classes], alone, rtol=0, atol=1e-6)
            assert torch.isinf(mixed[rows, classes:]).all()
        by_name = model(x, [model.task_names[i] for i in task_ids])
        assert torch.equal(by_name, mixed)


def test_mixed_task_batch_trains_every_task_in_it():
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 3})).train()
    ids = torch.tensor([0, 1, 1, 0])
    logits = model(images(model), ids)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    for task in ("a", "b"):
        assert model.routes[task].logits.grad.abs().sum() > 0
        assert model.heads[task].weight.grad.abs().sum() > 0


def test_task_parameters_are_the_route_and_head_only():
    model = tiny_conv(tasks={"a": 3, "b": 3})
    params = model.task_parameters("a")
    assert len(params) == 3  # route logits, head weight, head bias
    assert any(p is model.routes["a"].logits for p in params)


def test_frozen_norm_stats_stay_put_in_training_mode():
    model = moved_off_init(tiny_conv(tasks={"a": 3})).freeze_norm_stats()
    model.set_batchnorm_folding(False)  # eval as unfolded: bit-identical to the train mode
    model.train()
    before = {k: v.clone() for k, v in model.norm_stats["a"].state_dict().items()}
    with torch.no_grad():
        train_out = model(images(model), "a")
        eval_out = model.eval()(images(model), "a")
    for key, value in model.norm_stats["a"].state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(train_out, eval_out)
    model.freeze_norm_stats(False).train()
    model(images(model), "a")
    assert not torch.equal(
        model.norm_stats["a"].state_dict()["trunk__stem__1__running_mean"],
        before["trunk__stem__1__running_mean"],
    )
