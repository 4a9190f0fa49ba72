"""Mixed-task batches run with fixed shapes and equal running each task alone."""

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import modnet
from modnet import mixed
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit

ROUTES = ["softmax", "linear", "hyper", "hard"]
IDS = torch.tensor([1, 0, 2, 1, 1, 0, 2])


def tiny_timm_vit() -> modnet.ModularNet:
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=3
    )
    model = modnet.from_timm(vit, task="a", route="softmax")
    model.reset_classifier(3, task="a")
    model.add_task("b", 5)
    model.add_task("c", 2)
    return model


def build(family: str, route: str) -> modnet.ModularNet:
    if family == "timm":
        return moved_off_init(tiny_timm_vit())
    make = tiny_conv if family == "conv" else tiny_vit
    model = moved_off_init(make(tasks={"a": 3, "b": 5, "c": 2}, route=route))
    model.set_route("c", [1, 1, 0])  # a shorter hard route: layer 3 is skipped
    return model


def per_task(model, x, ids):
    """Each task's samples run alone; returns {task: (rows, logits)}."""
    return {
        name: (rows, model(x[rows], name))
        for t, name in enumerate(model.task_names)
        if len(rows := (ids == t).nonzero().flatten())
    }


CASES = [(f, r) for f in ("conv", "vit") for r in ROUTES] + [("timm", "hard+softmax")]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(("family", "route"), CASES)
@pytest.mark.parametrize("path", ["grouped", "chunked"])
def test_grouped_batch_equals_each_task_alone(family, route, mode, path):
    model = build(family, route)
    model.mixed_batches = path
    reference = copy.deepcopy(model)
    getattr(model, mode)(), getattr(reference, mode)()
    x = images(model, batch=7)
    mixed = model(x, IDS)
    for name, (rows, alone) in per_task(reference, x, IDS).items():
        classes = model.task_classes[name]
        torch.testing.assert_close(mixed[rows, :classes], alone, rtol=0, atol=1e-5)
        assert torch.isinf(mixed[rows, classes:]).all()
    # running statistics moved per task exactly as when each task ran alone
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.fixture
def in_place_mixes(monkeypatch) -> list[int]:
    """Grows by one entry whenever a linear layer mixes its weights in place."""
    from modnet.grouped import GroupedLinear

    calls: list[int] = []
    original = GroupedLinear._mix_and_multiply
    monkeypatch.setattr(
        GroupedLinear,
        "_mix_and_multiply",
        lambda self, *a: calls.append(1) or original(self, *a),
    )
    return calls


@pytest.mark.parametrize(("family", "route"), [c for c in CASES if c[0] != "conv"])
def test_linear_layers_mixing_in_place_equal_each_task_alone(family, route, in_place_mixes):
    """Without autograd a chunk's linear layers mix their weights just before use."""
    model = build(family, route).eval()
    ids = torch.tensor([1, 0, 2, 1, 0, 2])  # two samples a task: one chunk of all three
    x = images(model, batch=6)
    with torch.inference_mode():
        mixed = model(x, ids)
        alone = per_task(model, x, ids)
    assert in_place_mixes, "no linear layer mixed its weights in place"
    for name, (rows, logits) in alone.items():
        classes = model.task_classes[name]
        torch.testing.assert_close(mixed[rows, :classes], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["conv", "vit"])
@pytest.mark.parametrize("path", ["grouped", "chunked"])
def test_grouped_batch_gradients_equal_the_sum_over_tasks(family, path):
    model = build(family, "softmax")
    model.mixed_batches = path
    reference = copy.deepcopy(model)
    x, y = images(model, batch=7), torch.tensor([0, 1, 1, 0, 2, 1, 0])
    ids = torch.tensor([1, 0, 1, 1, 1, 0, 1])  # task c absent
    if path == "chunked":  # a and b with 3 samples each: one chunk, run together
        x, y, ids = x[:6], y[:6], torch.tensor([1, 0, 1, 0, 1, 0])
    F.cross_entropy(model(x, ids), y, reduction="sum").backward()
    for _name, (rows, logits) in per_task(reference, x, ids).items():
        F.cross_entropy(logits, y[rows], reduction="sum").backward()
    for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None, key  # absent tasks get no gradient at all
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=key)
    assert all(p.grad is None for p in model.task_parameters("c"))


@pytest.mark.parametrize("family", ["conv", "vit"])
def test_split_and_grouped_batches_agree(family):
    model = build(family, "hyper").eval()
    x = images(model, batch=7)
    with torch.no_grad():
        model.mixed_batches = "split"
        split = model(x, IDS)
        for path in ("grouped", "chunked", "auto"):
            model.mixed_batches = path
            torch.testing.assert_close(model(x, IDS), split, rtol=0, atol=1e-5, msg=path)
            features = model.forward_features(x, IDS)
            head = model.forward_head(features, IDS)
            torch.testing.assert_close(head, split, rtol=0, atol=1e-5, msg=path)


def test_frozen_norm_stats_stay_put_in_a_grouped_training_batch():
    model = build("conv", "softmax").train().freeze_norm_stats()
    model.mixed_batches = "grouped"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(images(model, batch=7), IDS)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("path", ["grouped", "chunked"])
def test_many_tasks_in_one_batch(path):
    model = moved_off_init(tiny_conv(tasks={f"t{i}": 2 + i % 3 for i in range(16)})).train()
    model.mixed_batches = path
    reference = copy.deepcopy(model)
    x, ids = images(model, batch=16), torch.arange(16).flip(0)
    mixed = model(x, ids)
    for _name, (rows, alone) in per_task(reference, x, ids).items():
        torch.testing.assert_close(mixed[rows, : alone.shape[1]], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["grouped", "chunked"])
def test_grouped_batch_drops_paths_at_each_position_rate(path):
    model = moved_off_init(tiny_vit(tasks={"a": 3, "b": 5}, drop_path_rate=[0.0, 0.0, 0.0, 0.9]))
    model.mixed_batches = path
    x, ids = images(model, batch=8), torch.arange(8) % 2  # chunked: a and b in one chunk
    assert model._grouped_drop_paths
    with torch.no_grad():
        evaluated = model.eval()(x, ids)
        model.mixed_batches = "split"
        torch.testing.assert_close(model(x, ids), evaluated, rtol=0, atol=1e-5)
        model.mixed_batches = path
        model.train()
        trained = [model(x, ids) for _ in range(4)]
    assert all(torch.isfinite(t[:, :3]).all() for t in trained)
    assert any(not torch.allclose(t, evaluated) for t in trained)  # the last layer drops


def test_chunks_hold_tasks_with_equal_counts_within_the_budget():
    layer = 2**20  # one task's mixed layer weights: 1 MiB
    chunks = mixed.plan_chunks([1, 3, 0, 1, 3, 1, 16], layer)
    assert [(c.tasks, c.size, c.start) for c in chunks] == [
        ([0, 3, 5], 1, 0),
        ([1, 4], 3, 3),
        ([6], 16, 9),
    ]
    many = mixed.plan_chunks([1] * 40, mixed.CHUNK_BYTES // 4)
    assert [len(c.tasks) for c in many] == [4] * 10
    assert mixed.plan_chunks([1] * 3, 10 * mixed.CHUNK_BYTES)[0].tasks == [0]


def test_the_default_eager_path_is_chunked():
    model = build("vit", "softmax")
    x = images(model, batch=7)
    assert model.mixed_batches == "auto" and mixed.mode(model) == "chunked"
    model.mixed_batches = "nope"
    with pytest.raises(ValueError, match="unknown mixed_batches 'nope'"):
        model(x, IDS)


def test_the_readme_names_the_eager_default_the_code_runs():
    model = build("vit", "softmax")
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    eager = mixed.mode(model)
    assert f'batches that mix tasks run "{eager}" in eager mode' in readme
    assert "split by task in eager mode" not in readme


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "interleaved"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(in_channels=6, out_channels=12, kernel_size=1),
        dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
        dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1),
    ],
    ids=["pointwise", "depthwise", "strided"],
)
def test_grouped_conv_gives_each_sample_its_weights_in_any_layout(conv, layout):
    from modnet.grouped import IDS, GroupedConv2d

    torch.manual_seed(0)
    source = torch.nn.Conv2d(**conv)
    layer = GroupedConv2d(source).to_empty(device="cpu")
    tasks, batch = 3, 5
    weight = torch.randn(tasks, *source.weight.shape)
    bias = torch.randn(tasks, source.out_channels)
    ids = torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        layer.weight, layer.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    setattr(layer, IDS, ids)
    x = torch.randn(batch, 6, 7, 7)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "interleaved":  # [H, W, B, C] in memory, as grouped convs return
        x = x.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    out = layer(x)
    for i, t in enumerate(ids.tolist()):
        expected = F.conv2d(
            x[i : i + 1], weight[t], bias[t], source.stride, source.padding, groups=source.groups
        )
        torch.testing.assert_close(out[i : i + 1], expected, rtol=1e-5, atol=1e-5)


CONVERTED = ["vit-layerscale-registers", "mixer", "resmlp", "gmlp", "convmixer"]


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_timm_models_run_mixed_batches_as_each_task_alone(name, in_place_mixes):
    """Every architecture ``from_timm`` accepts, in a chunk of tasks without autograd
    (Mixer and gMLP: linear layers mixing in place, token-mixing MLPs reading
    transposed inputs; the others run task by task)."""
    from tests.test_from_timm import MODELS

    model = modnet.from_timm(MODELS[name](), task="a", route="softmax")
    for task, classes in (("b", 4), ("c", 3)):
        model.add_task(task, classes)
    model = moved_off_init(model).eval()
    ids = torch.tensor([1, 0, 2, 1, 0, 2])
    x = images(model, batch=6)
    with torch.inference_mode():
        mixed = model(x, ids)
        alone = per_task(model, x, ids)
    assert bool(in_place_mixes) == (name in ("mixer", "gmlp"))
    for task, (rows, logits) in alone.items():
        classes = model.task_classes[task]
        torch.testing.assert_close(mixed[rows, :classes], logits, rtol=0, atol=1e-5)
