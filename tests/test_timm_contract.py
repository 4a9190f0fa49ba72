"""timm's own expectations of a model, run over every ``modnet_*`` entry point.

The checks follow timm's ``tests/test_models.py`` (forward, backward, default cfgs,
features, forward_intermediates, grad checkpointing), with small width and image
size overrides so they run in seconds, plus the rest of the contract that timm's
``train.py`` and data tools rely on (``num_classes=0``, ``reset_classifier(0)``,
``drop_rate``, ``drop_path_rate``, ``global_pool``, ``pretrained_cfg``).

Adapted from timm: a modnet model made without ``num_classes`` has no task yet
(tasks are added per dataset), so the checks pass ``num_classes``. TorchScript
(``test_model_forward_torchscript``) does not apply: the forward takes task names
and per-sample task tensors and binds pooled weights into a block per call, which
``torch.jit.script`` cannot compile; ``torch.compile`` and ``torch.export`` (the
successors of TorchScript) are covered in ``test_compile.py`` and by ``export``.
"""

import copy
import math

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import FeatureInfo, get_pretrained_cfg

import modnet  # noqa: F401  (registers the entry points)
from modnet import benchmark, io
from modnet.errors import ConfigError
from tests.conftest import TINY_CONV, TINY_VIT

NAMES = timm.list_models("modnet_*")


def small(name: str) -> dict:
    return dict(TINY_CONV if "_conv_" in name else TINY_VIT)


def create(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, **{**small(name), **kwargs})


def batch(model, size: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, *model.pretrained_cfg["input_size"], generator=generator)


def check_map(output, channels, reduction, size, pool_size):
    """timm's bound on a feature map's size, and the exact size the cfg promises."""
    assert output.shape[1] == channels
    assert output.shape[2] <= math.ceil(size[0] / reduction) + 1
    assert output.shape[3] <= math.ceil(size[1] / reduction) + 1
    assert tuple(output.shape[2:]) == tuple(pool_size)
    assert not torch.isnan(output).any()


def test_every_entry_point_is_checked():
    assert set(NAMES) >= {"modnet_conv_tiny", "modnet_conv_small", "modnet_vit_tiny"}


@pytest.mark.parametrize("name", NAMES)
def test_model_forward(name):
    model = create(name, num_classes=5).eval()
    outputs = model(batch(model, 1))
    assert outputs.shape == (1, 5)
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_backward(name):
    model = create(name, num_classes=42).train()
    outputs = model(batch(model))
    outputs.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"No gradient for {n}"
    assert outputs.shape[-1] == 42
    assert not torch.isnan(outputs).any()


@pytest.mark.parametrize("name", NAMES)
def test_model_default_cfgs(name):
    assert get_pretrained_cfg(name) is not None
    model = create(name, num_classes=5).eval()
    state_dict = model.state_dict()
    cfg = model.default_cfg
    x = batch(model, 1)
    features = model.forward_features(x)
    if "_conv_" in name:
        assert tuple(features.shape[-2:]) == tuple(cfg["pool_size"])
    else:
        assert features.shape[-1] == model.num_features
    assert cfg["classifier"] + ".weight" in state_dict
    assert cfg["first_conv"] + ".weight" in state_dict
    model.reset_classifier(0)
    outputs = model(x)
    assert outputs.shape == (1, model.num_features)
    if "_conv_" in name:
        model.reset_classifier(0, "")  # no pooling: the forward returns the maps
        assert tuple(model(x).shape[-2:]) == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_features(name):
    model = create(name, features_only=True, num_classes=3).eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) == min(4, small(name)["depth"])
    size = model.pretrained_cfg["input_size"][-2:]
    outputs = model(batch(model, 1))
    assert len(outputs) == len(expected_channels)
    for c, r, o in zip(expected_channels, expected_reduction, outputs, strict=True):
        check_map(o, c, r, size, model.pretrained_cfg["pool_size"])


@pytest.mark.parametrize("name", NAMES)
def test_features_only_picks_layers_and_tasks(name):
    model = create(name, features_only=True, tasks={"a": 2, "b": 3}, out_indices=(0, 2))
    model.eval()
    x = batch(model)
    inner = model.model
    expected = inner.forward_intermediates(x, indices=[0, 2], task="b", intermediates_only=True)
    got = model(x, task="b")
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    with pytest.raises(ValueError, match="several tasks"):
        model(x)


@pytest.mark.parametrize("name", NAMES)
def test_features_only_defaults_to_the_layers_a_shallow_model_has(name):
    net = create(name, features_only=True, depth=3)
    maps = net(batch(net))
    assert net.feature_info.channels() == [net.model.num_features] * 3
    assert [m.shape[1] for m in maps] == net.feature_info.channels()
    assert len(create(name, features_only=True, depth=6).feature_info.channels()) == 4


def fits_depth_3(argument: str, value: str) -> str:
    return (
        f"{argument}={value} does not fit a model of depth 3: give a count of last layers "
        "in 1..3 or layer positions in -3..2"
    )


@pytest.mark.parametrize("out_indices", [(0, 3), (-4,), 4, 0, ()])
def test_out_indices_out_of_range_are_refused_at_creation(out_indices):
    with pytest.raises(ConfigError) as error:
        create("modnet_vit_tiny", features_only=True, depth=3, out_indices=out_indices)
    assert str(error.value) == fits_depth_3("out_indices", repr(out_indices))


def test_forward_intermediates_refuses_indices_out_of_range():
    model = create("modnet_conv_tiny", num_classes=3, depth=3)
    for indices in ([7], [0, -4], 4, 0):
        with pytest.raises(ConfigError) as error:
            model.forward_intermediates(batch(model), indices=indices)
        assert str(error.value) == fits_depth_3("indices", repr(indices))
    assert len(model.forward_intermediates(batch(model), indices=[0, -1])[1]) == 2


@pytest.mark.parametrize("name", NAMES)
def test_model_forward_intermediates(name):
    model = create(name, num_classes=3).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    x = batch(model, 1)
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(feature_info.channels()) == small(name)["depth"]
    size = x.shape[-2:]
    for c, r, o in zip(
        feature_info.channels(), feature_info.reduction(), intermediates, strict=True
    ):
        check_map(o, c, r, size, model.pretrained_cfg["pool_size"])
    assert torch.equal(output, model.forward_features(x))
    # The last layer's output, normed, is what forward_features returns.
    (last,) = model.forward_intermediates(
        x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True
    )
    tokens = output if output.ndim == 3 else output.flatten(2).transpose(1, 2)
    assert torch.equal(last, tokens[:, -last.shape[1] :])
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(output, output3, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_gives_the_same_outputs_gradients_and_statistics(name):
    plain = create(name, num_classes=4, drop_path_rate=0.3, drop_rate=0.2).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = batch(plain, 4)
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(3)
        out = model(x)
        out.square().mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    for n, g in grads_a.items():
        torch.testing.assert_close(grads_b[n], g, rtol=0, atol=1e-7, msg=n)
    for (n, a), (_, b) in zip(plain.named_buffers(), checkpointed.named_buffers(), strict=True):
        assert torch.equal(a, b), n  # BatchNorm statistics updated once, not twice


def test_grad_checkpointing_lowers_peak_training_memory():
    model = timm.create_model(
        "modnet_vit_tiny",
        num_classes=10,
        img_size=32,
        patch_size=4,
        embed_dim=64,
        num_heads=2,
        num_templates=2,
        depth=8,
    )
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    plain = benchmark.peak_memory(benchmark.training_workload(model, x, y))
    model.set_grad_checkpointing()
    checkpointed = benchmark.peak_memory(benchmark.training_workload(model, x, y))
    assert checkpointed < 0.6 * plain


@pytest.mark.parametrize("name", NAMES)
def test_train_py_arguments_are_honoured(name):
    model = create(name, num_classes=3, drop_rate=0.5, drop_path_rate=0.2, global_pool="avg")
    depth = small(name)["depth"]
    assert model.drop_path_rates == pytest.approx(torch.linspace(0, 0.2, depth).tolist())
    x = batch(model)
    model.train()
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x))  # dropout and drop-path are active
    torch.manual_seed(0)
    assert torch.equal(first, model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_drop_path_rate_belongs_to_the_layer_position_not_the_template():
    model = create("modnet_conv_tiny", num_classes=2, drop_path_rate=[0.0, 0.0, 0.0, 0.9])
    model.set_route("default", [0, 0, 0, 0])  # one template at every depth
    seen = []
    skeleton = model.pool._binder.module
    skeleton.drop_path.register_forward_pre_hook(lambda m, _: seen.append(m.drop_prob))
    model.train()(batch(model))
    assert seen == [0.0, 0.0, 0.0, 0.9]


def test_global_pool_max_pools_the_features():
    model = create("modnet_conv_tiny", num_classes=0, global_pool="max").eval()
    x = batch(model)
    maps = model.forward_features(x)
    assert torch.equal(model(x), maps.amax(dim=(2, 3)))
    model.reset_classifier(0, "catavgmax")
    assert model(x).shape == (2, 2 * model.num_features)


NO_POOL_WITH_HEAD = (
    "global_pool='' (no pooling) cannot feed a linear classifier, which needs pooled "
    "features: use num_classes=0 to get the unpooled feature maps, or a pooling such as 'avg'"
)


def test_no_pooling_gives_unpooled_maps_without_a_head_and_is_refused_with_one():
    # as timm: unpooled maps when the classifier is removed, refused at creation otherwise
    model = create("modnet_conv_tiny", num_classes=0, global_pool="").eval()
    x = batch(model)
    maps = model(x)
    assert maps.shape == (2, model.num_features, *model.pretrained_cfg["pool_size"])
    assert torch.equal(maps, model.forward_features(x))
    for classes in (dict(num_classes=5), dict(tasks={"a": 0, "b": 3})):
        with pytest.raises(ConfigError) as error:
            create("modnet_conv_tiny", global_pool="", **classes)
        assert str(error.value) == NO_POOL_WITH_HEAD


@pytest.mark.parametrize(
    "name, choices",
    [
        ("modnet_conv_tiny", "'avg', 'max', 'avgmax', 'catavgmax'"),
        ("modnet_vit_tiny", "'token', 'avg', 'avgmax', 'max', 'map', 'prr'"),
    ],
)
def test_an_unknown_global_pool_is_refused_at_creation(name, choices):
    with pytest.raises(ConfigError) as error:
        create(name, num_classes=5, global_pool="bogus")
    assert str(error.value) == (
        f"unknown global_pool 'bogus': choose one of {choices}, or '' for no pooling"
    )
    assert create("modnet_conv_tiny", num_classes=5, global_pool="fastavg").num_classes == 5


def test_trunks_check_a_new_pooling_before_it_is_set():
    # what reset_classifier(..., global_pool=...) can ask before changing anything
    conv = create("modnet_conv_tiny", num_classes=5).trunk
    conv.check_global_pool("max", classifier=True)
    conv.check_global_pool("", classifier=False)
    with pytest.raises(ConfigError) as error:
        conv.check_global_pool("", classifier=True)
    assert str(error.value) == NO_POOL_WITH_HEAD
    vit = create("modnet_vit_tiny", num_classes=5).trunk
    vit.check_global_pool("", classifier=True)  # per-token logits, as timm's ViT
    with pytest.raises(ConfigError) as error:
        vit.check_global_pool("map")
    assert str(error.value) == (
        "global_pool='map' is an attention pool, which only creating the model builds: "
        "create the model with global_pool='map'"
    )
    with pytest.raises(ConfigError, match="^unknown global_pool 7: choose one of 'token'"):
        vit.check_global_pool(7)


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_zero_gives_pooled_features_and_saves(name, tmp_path):
    model = create(name, num_classes=0).eval()
    x = batch(model)
    features = model(x)
    assert model.num_classes == 0
    assert features.shape == (2, model.num_features)
    assert torch.equal(features, model.forward_head(model.forward_features(x), pre_logits=True))
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m")
    assert loaded.num_classes == 0
    assert torch.equal(loaded(x), features)


def test_reset_classifier_zero_then_save_and_load(tmp_path):
    model = create("modnet_conv_tiny", num_classes=5).eval()
    model.reset_classifier(0)
    assert model.num_classes == 0
    x = batch(model)
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m")
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("start, pool", [("token", "avg"), ("avg", "token")])
def test_a_vit_whose_pooling_was_reset_saves_loads_and_exports(tmp_path, start, pool):
    from modnet.export import load_safe, save_safe

    model = timm.create_model("modnet_vit_tiny", num_classes=3, global_pool=start, **TINY_VIT)
    model.reset_classifier(3, global_pool=pool)
    model.eval()
    x = batch(model)
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m")
    assert torch.equal(loaded.eval()(x), model(x))
    net = model.export("default").eval()
    save_safe(net, model.config, tmp_path / "safe")
    assert torch.equal(load_safe(tmp_path / "safe").eval()(x), net(x))


def test_reset_classifier_checks_the_pooling_before_changing_anything():
    model = timm.create_model("modnet_conv_tiny", tasks={"a": 3, "b": 0}, **TINY_CONV)
    with pytest.raises(ValueError, match="unknown global_pool 'bogus': choose one of"):
        model.reset_classifier(3, global_pool="bogus", task="a")
    with pytest.raises(ValueError, match="global_pool='' .no pooling. cannot feed a linear"):
        model.reset_classifier(0, global_pool="", task="b")  # task a keeps its head
    assert model.task_classes == {"a": 3, "b": 0}
    assert model.trunk.global_pool.pool_type == "avg"
    model.reset_classifier(0, global_pool="", task="a")  # no head is left: maps come out
    assert model(batch(model), task="a").ndim == 4
    with pytest.raises(ValueError, match="cannot feed a linear classifier"):
        model.add_task("c", 2)
    assert "c" not in model.task_names


def test_features_only_without_classes_extracts_with_a_headless_task():
    net = create("modnet_vit_tiny", features_only=True)
    maps = net(batch(net))
    assert [m.shape[1] for m in maps] == net.feature_info.channels()
    assert net.model.task_classes == {"default": 0}


@pytest.mark.parametrize("name, grid", [("modnet_conv_tiny", (8, 12)), ("modnet_vit_tiny", (4, 6))])
def test_img_size_may_be_a_height_width_pair(name, grid, tmp_path):
    # timm's convention; both families take non-square images
    model = create(name, num_classes=5, img_size=(16, 24)).eval()
    assert model.pretrained_cfg["input_size"] == (3, 16, 24)
    x = torch.randn(2, 3, 16, 24)
    logits = model(x)
    assert logits.shape == (2, 5)
    _, (last,) = model.forward_intermediates(x, indices=1)
    assert tuple(last.shape[2:]) == tuple(model.pretrained_cfg["pool_size"]) == grid
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m")
    assert torch.equal(loaded(x), logits)
    assert create(name, img_size=[16, 16]).config["img_size"] == 16  # a square pair: its int


@pytest.mark.parametrize("img_size", [(16,), (16, 24, 8), (16, 0), -8, "16", 16.0, (16, True)])
@pytest.mark.parametrize("name", ["modnet_conv_tiny", "modnet_vit_tiny"])
def test_an_img_size_that_is_no_int_or_pair_is_refused(name, img_size):
    with pytest.raises(ConfigError) as error:
        create(name, num_classes=5, img_size=img_size)
    assert str(error.value) == (
        f"img_size must be a positive int or a (height, width) pair of them, got {img_size!r}"
    )


def test_each_side_of_img_size_must_be_divisible_by_the_stem_stride():
    with pytest.raises(ConfigError) as error:
        create("modnet_conv_tiny", num_classes=5, img_size=(16, 15))
    assert str(error.value) == (
        "img_size=(16, 15) must be divisible by stem_stride=2: choose img_size as a multiple "
        "of stem_stride"
    )


def test_an_unknown_activation_is_refused_with_the_names_timm_knows():
    with pytest.raises(ConfigError) as error:
        create("modnet_conv_tiny", num_classes=5, act="bogus")
    assert str(error.value) == (
        "unknown activation act='bogus': choose one of celu, elu, gelu, gelu_tanh, hard_mish, "
        "hard_sigmoid, hard_swish, hardsigmoid, hardswish, identity, leaky_relu, mish, prelu, "
        "quick_gelu, relu, relu6, selu, sigmoid, silu, swish, tanh"
    )
    assert create("modnet_conv_tiny", num_classes=5, act="gelu").config["act"] == "gelu"


@pytest.mark.parametrize(
    "options, message",
    [
        (
            dict(embed_dim=25, num_heads=2),
            "embed_dim=25 must be divisible by num_heads=2: choose embed_dim as a multiple "
            "of num_heads",
        ),
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
    ],
)
def test_vit_embed_dim_must_split_into_the_heads(options, message):
    with pytest.raises(ConfigError) as error:
        create("modnet_vit_tiny", num_classes=5, **options)
    assert str(error.value) == message


def test_pretrained_cfg_overlay_is_kept():
    model = create("modnet_conv_tiny", pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3)))
    assert resolve_data_config(model=model)["mean"] == (0.1, 0.2, 0.3)


def test_no_num_classes_means_no_task_yet():
    model = create("modnet_conv_tiny")
    assert model.task_names == []
    with pytest.raises(ValueError, match="add one with model.add_task"):
        model(batch(model))


def test_pretrained_cfg_follows_the_training_normalisation_through_a_checkpoint(tmp_path):
    model = create("modnet_conv_tiny", in_chans=1, tasks={"digits": 10})
    assert resolve_data_config(model=model)["mean"] == (0.5,)
    transform = {"mean": [0.1307], "std": [0.3081]}
    io.save_model(model, tmp_path / "m", task_info={"digits": {"transform": transform}})
    loaded, manifest = io.load_model(tmp_path / "m")
    config = resolve_data_config(model=loaded)
    assert config["mean"] == (0.1307,) and config["std"] == (0.3081,)
    assert config["input_size"] == (1, 8, 8)
    assert manifest["pretrained_cfg"]["mean"] == [0.1307]


def test_a_trained_run_checkpoint_carries_its_normalisation(tmp_path):
    from modnet.train import train
    from tests.conftest import tiny_train_config

    kwargs = dict(depth=2, width=8, exp_ratio=2.0, img_size=16, num_templates=2)
    config = tiny_train_config(
        kwargs, tasks=["synth_color"], train_limit=64, test_limit=32, epochs=1
    )
    train(config, tmp_path / "run")
    model, manifest = io.load_model(tmp_path / "run")
    transform = manifest["tasks"]["synth_color"]["transform"]
    data_config = resolve_data_config(model=model)
    assert data_config["mean"] == pytest.approx(transform["mean"])
    assert data_config["std"] == pytest.approx(transform["std"])
    assert data_config["mean"] != (0.5, 0.5, 0.5)


def test_timm_getter_feature_class_works_too():
    net = create("modnet_conv_tiny", features_only=True, feature_cls="getter", num_classes=3)
    maps = net(batch(net))
    assert [m.shape[1] for m in maps] == net.feature_info.channels()


@pytest.mark.parametrize("name", NAMES)
def test_the_registry_says_the_input_size_is_fixed_as_the_model_does(name):
    registered = timm.models.get_pretrained_cfg(name)
    model = create(name)
    assert registered.fixed_input_size is True
    assert model.pretrained_cfg["fixed_input_size"] is True
    channels, height, width = model.pretrained_cfg["input_size"]
    with pytest.raises(ValueError, match=f"expected {height}x{width} images"):
        model(torch.randn(1, channels, height + 16, width + 16))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the input checks, traced away
def test_scripting_is_refused_in_one_line_and_tracing_works():
    model = create("modnet_conv_tiny", num_classes=3).eval()
    x = batch(model)
    with pytest.raises(TypeError, match=r"^modnet models cannot be scripted with torch.jit.script"):
        torch.jit.script(model)
    traced = torch.jit.trace(model, x)
    assert torch.equal(traced(x), model(x))
