"""Mistakes with the model's Python API: refused in one line, before anything changes."""

import numpy as np
import pytest
import torch

from modnet import HyperNetwork
from modnet.errors import ConfigError
from modnet.factory import build_model
from modnet.options import check_model_options
from tests.conftest import images, tiny_conv, tiny_vit


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_a_wrong_input_dtype_names_the_conversion(build):
    model = build(tasks={"a": 3})
    x = images(model, 2)
    with pytest.raises(ValueError, match=r"^expected float images, got dtype torch.uint8: "):
        model((x * 255).to(torch.uint8), task="a")
    for dtype in (torch.float64, torch.float16):
        message = f"the input is {dtype} but the model's weights are torch.float32: pass x.to"
        with pytest.raises(ValueError, match=message):
            model(x.to(dtype), task="a")
        with pytest.raises(ValueError, match=message):
            model.forward_features(x.to(dtype), task="a")
    # mixed precision is what autocast is for: its input is fp32 or autocast's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x, task="a").float()).all()
        assert torch.isfinite(model(x.bfloat16(), task="a").float()).all()
        message = (
            r"the input is torch.float64 but the model's weights are torch.float32 "
            r"\(torch.autocast runs torch.bfloat16\): pass x.to\(torch.float32\)$"
        )
        with pytest.raises(ValueError, match=message):
            model(x.double(), task="a")


def test_a_failed_grow_leaves_the_pool_as_it_was():
    model = tiny_conv(tasks={"a": 3})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match="unknown task 'zz'"):
        model.grow(1, task="zz")
    assert model.pool.num_templates == 3
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(model.grow(1, task="a")) == [3]


def test_deleting_the_first_task_drops_its_normalisation_from_the_data_config():
    model = tiny_conv(tasks={"a": 3, "b": 2})
    family = model.pretrained_cfg["mean"]
    model.set_normalization("a", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    model.delete_task("a")
    assert model.pretrained_cfg["mean"] == family and model.pretrained_cfg["std"] == (0.5,) * 3
    # values a user sets in pretrained_cfg are theirs: kept while no task gives others
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.2, 0.2, 0.2)}
    model.delete_task("b")
    assert model.pretrained_cfg["mean"] == (0.2, 0.2, 0.2)


def test_task_indices_may_be_numpy_integers_and_class_counts_whole_numbers():
    model = tiny_conv(tasks={"a": 3, "b": 5})
    x = images(model, 2)
    assert torch.equal(model(x, task=np.int64(1)), model(x, task="b"))
    model.add_task("c", np.int64(2))
    assert model.task_classes["c"] == 2
    for bad in (2.5, True, "4"):
        with pytest.raises(ValueError, match="task 'd' needs num_classes as a whole number"):
            model.add_task("d", bad)
        with pytest.raises(ValueError, match="task 'c' needs num_classes as a whole number"):
            model.reset_classifier(bad, task="c")
    assert "d" not in model.task_names and model.task_classes["c"] == 2


def test_an_integer_route_tensor_must_be_one_dimensional():
    model = tiny_conv(tasks={"a": 3})
    one_hot = torch.eye(3, dtype=torch.long)[[0, 1, 2, 0]]
    message = r"must be 1-D template indices, got shape \(4, 3\): pass coefficients"
    with pytest.raises(ValueError, match=message):
        model.set_route("a", one_hot)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        model.set_route("a", torch.tensor([[0, 1], [2, 0]]))
    model.set_route("a", one_hot.float())  # the same rows as coefficients
    assert torch.equal(model.routes["a"].plan(None).coefficients, one_hot.float())


def test_a_route_with_non_finite_coefficients_is_refused_and_the_task_keeps_its_own():
    from modnet.routing import HyperRoute, SoftRoute

    model = tiny_conv(tasks={"a": 3})
    depth, count = model.depth, model.pool.num_templates
    x = images(model, 2)
    with torch.no_grad():
        before = model(x, task="a")
    message = r"^the route for task 'a' gives non-finite coefficients \(nan or inf\)"
    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=message):
            model.set_route("a", torch.full((depth, count), value))
    with pytest.raises(ValueError, match=message.replace("'a'", "'c'")):
        model.add_task("c", 3, route=torch.full((depth, count), float("nan")))
    assert model.task_names == ["a"]
    with torch.no_grad():
        assert torch.equal(model(x, task="a"), before)
    # a -inf logit leaves a template out of a softmax or sparsemax route
    for normalize in ("softmax", "sparsemax"):
        route = SoftRoute(depth, count, normalize=normalize)
        with torch.no_grad():
            route.logits[:, 1:] = float("-inf")
        model.set_route("a", route)
        with torch.no_grad():
            assert torch.equal(model.routes["a"].coefficients()[:, 0], torch.ones(depth))
            assert torch.isfinite(model(x, task="a")).all()
        with torch.no_grad():
            route.logits[0] = float("-inf")  # a layer that keeps no template
        with pytest.raises(ValueError, match=message):
            model.set_route("a", route)
    hyper = tiny_conv(tasks={"a": 3}, route="hyper")
    embedding = HyperRoute(hyper.hypernet.embed_dim, depth, count, count)
    hyper.set_route("a", embedding)  # finite: taken
    with torch.no_grad():
        embedding.embedding.fill_(float("nan"))
    with pytest.raises(ValueError, match=message):
        hyper.set_route("a", embedding)


def test_an_empty_batch_with_per_sample_tasks_gives_empty_logits():
    model = tiny_conv(tasks={"a": 3, "b": 5})
    x = images(model, 2)[:0]
    out = model(x, task=torch.tensor([], dtype=torch.long))
    assert out.shape == (0, 5)
    assert model.forward_features(x, task=[]).shape[0] == 0


def test_a_mixed_batch_never_puts_features_beside_logits():
    model = tiny_conv(tasks={"a": 3, "b": 5})
    model.reset_classifier(0, task="a")
    x = images(model, 2)
    with pytest.raises(ValueError, match=r"^tasks \['a'\] have no head, so their outputs"):
        model(x, task=["a", "b"])
    # tasks alike may share a batch
    assert torch.equal(model(x, task=["a", "a"]), model(x, task="a"))


def test_a_wrong_image_size_names_the_img_size_that_would_fit():
    model = tiny_conv(tasks={"a": 3})
    with pytest.raises(ValueError, match=r"build the model with img_size=\(8, 12\)$"):
        model(torch.randn(1, 3, 8, 12), task="a")
    with pytest.raises(ValueError, match=r"build the model with img_size=12$"):
        model(torch.randn(1, 3, 12, 12), task="a")


def test_per_sample_tasks_are_names_or_integers_in_any_container():
    model = tiny_conv(tasks={"a": 3, "b": 5})
    x = images(model, 3)
    want = model(x, task=torch.tensor([0, 1, 0]))
    assert torch.equal(model(x, task=np.array([0, 1, 0])), want)
    assert torch.equal(model(x, task=[np.int64(0), "b", 0]), want)
    assert model(x[:0], task=np.zeros(0, dtype=np.int64)).shape == (0, 5)
    for bad in ([0.7, 1.2, 0], [True, False, True]):
        with pytest.raises(ValueError, match="per-sample tasks must be task names or integer"):
            model(x, task=bad)
    with pytest.raises(ValueError, match="1-D integer task ids, got dtype torch.bool"):
        model(x, task=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="1-D integer task ids, got dtype torch.float64"):
        model(x, task=np.array([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="task must be a name or an integer index, got True"):
        model(x, task=True)


HYPER_OPTION_ERRORS = [
    (
        dict(route="hyper", hyper_dim=0),
        "hyper_dim must be a positive int (the size of each task's embedding), got 0",
    ),
    (
        dict(route="hyper", hyper_dim=-2),
        "hyper_dim must be a positive int (the size of each task's embedding), got -2",
    ),
    (
        dict(route="hyper", hyper_dim=2.5),
        "hyper_dim must be a positive int (the size of each task's embedding), got 2.5",
    ),
    (
        dict(route="hyper", hyper_hidden=-1),
        "hyper_hidden must be an int >= 0 (the hypernetwork's hidden width, 0 for a linear "
        "map), got -1",
    ),
    (
        dict(route="hyper", hyper_normalize="tanh"),
        "hyper_normalize='tanh' is not one of softmax, linear, sparsemax",
    ),
    (
        dict(hyper_dim=4),
        "hyper_dim=4 only applies to route=hyper, and the route is softmax: set route=hyper "
        "or leave hyper_dim out",
    ),
    (
        dict(route="hard", hyper_hidden=16),
        "hyper_hidden=16 only applies to route=hyper, and the route is hard: set route=hyper "
        "or leave hyper_hidden out",
    ),
]


@pytest.mark.parametrize("options, message", HYPER_OPTION_ERRORS)
def test_hypernetwork_options_are_checked_as_the_command_line_checks_them(options, message):
    with pytest.raises(ConfigError) as error:
        tiny_conv(tasks={"a": 3}, **options)
    assert str(error.value) == message
    # the command line runs the same check, naming it a model option
    with pytest.raises(ConfigError) as error:
        check_model_options("modnet_conv_tiny", options)
    assert str(error.value) == f"model option {message}"


def test_hypernetwork_options_at_their_defaults_or_with_route_hyper_build():
    model = tiny_conv(tasks={"a": 3}, hyper_dim=8, hyper_hidden=0, hyper_normalize="linear")
    assert model.hypernet is None
    hyper = tiny_conv(tasks={"a": 3}, route="hyper", hyper_dim=np.int64(5), hyper_hidden=4)
    assert hyper.hypernet.embed_dim == 5 and hyper.routes["a"].spec()["embed_dim"] == 5
    # a config saved while a softmax model still took hypernetwork options rebuilds
    config = {**model.config, "hyper_dim": 4}
    assert build_model(config).config["hyper_dim"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 2, 3), "HyperNetwork embed_dim must be a positive int, got 0"),
        ((4, 0, 3), "HyperNetwork depth must be a positive int, got 0"),
        ((4, 2, 0), "HyperNetwork num_templates must be a positive int, got 0"),
        ((4, 2, 3, 0), "HyperNetwork num_tensors must be a positive int, got 0"),
        ((4, 2, 3, 1, -1), "HyperNetwork hidden must be an int >= 0 (0 for a linear map), got -1"),
    ],
)
def test_a_hypernetwork_of_impossible_sizes_is_refused(args, message):
    with pytest.raises(ConfigError) as error:
        HyperNetwork(*args)
    assert str(error.value) == message


def test_a_model_created_without_tasks_says_how_to_give_it_one():
    import timm

    model = timm.create_model("modnet_conv_tiny")
    x = images(model, 1)
    message = (
        r"^this model has no tasks yet: add one with model.add_task\(name, classes\), or create "
        r"it with num_classes=N \(one task, 'default'\) or tasks=\{name: classes\}$"
    )
    for call in (model, model.forward_features):
        with pytest.raises(ValueError, match=message):
            call(x)
    named = timm.create_model("modnet_conv_tiny", num_classes=4)
    assert named.task_names == ["default"] and named(x).shape == (1, 4)
