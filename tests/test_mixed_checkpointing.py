"""Activation checkpointing holds for batches that mix tasks, in every way they run."""

import copy

import pytest
import torch

from modnet import mixed
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit

IDS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # two samples a task: one chunk of four


def build(family: str, route: str, path: str):
    make = tiny_conv if family == "conv" else tiny_vit
    model = moved_off_init(make(tasks=dict.fromkeys("abcd", 3), route=route, drop_path_rate=0.3))
    if route == "hard":  # two routes for four tasks: the tasks share weights
        for task, layers in zip("abcd", ([0, 1, 2, 0], [2, 1, 0]) * 2, strict=True):
            model.set_route(task, layers)
    model.mixed_batches = path
    return model.train()


def saved_bytes(model, x) -> tuple[torch.Tensor, int]:
    """The logits and the bytes autograd keeps for the backward pass."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, IDS)
    return out, sum(saved)


@pytest.mark.parametrize(
    ("route", "path"),
    [("softmax", "chunked"), ("softmax", "grouped"), ("hard", "chunked")],
    ids=["chunked", "grouped", "shared-weights"],
)
@pytest.mark.parametrize("family", ["conv", "vit"])
def test_checkpointed_mixed_batches_keep_less_and_train_the_same(family, route, path):
    plain = build(family, route, path)
    shared = mixed.weight_sets(*mixed.task_coefficients(plain, list("abcd")))
    assert (shared is not None) == (route == "hard")
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = images(plain, batch=8)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)  # the same paths dropped
        out, kept = saved_bytes(model, x)
        out[torch.isfinite(out)].square().sum().backward()
        results.append((out, kept, {n: p.grad for n, p in model.named_parameters()}))
    (out_a, kept_a, grads_a), (out_b, kept_b, grads_b) = results
    # under 0.2: a chunk's mixed weights are not kept either (ViT chunked kept 0.26
    # when they were mixed before the checkpointed layer)
    assert kept_b < 0.2 * kept_a, (kept_b, kept_a)
    assert torch.equal(out_a, out_b)
    for name, grad in grads_a.items():
        if grad is None:
            assert grads_b[name] is None, name
        else:
            torch.testing.assert_close(grads_b[name], grad, rtol=0, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        assert torch.equal(a, b), name  # BatchNorm statistics updated once, not twice
