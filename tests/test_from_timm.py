"""from_timm: a converted timm model computes exactly what timm computes, or is refused."""

import json
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.models.convmixer import ConvMixer
from timm.models.mlp_mixer import Affine, GatedMlp, MlpMixer, ResBlock, SpatialGatingBlock
from timm.models.vision_transformer import VisionTransformer

import modnet
from modnet import io
from modnet.errors import ConfigError


def trained_looking(model):
    """Moves every parameter off its initialisation (timm zero-initialises some heads)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def small_vit(**kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)
    return trained_looking(VisionTransformer(**{**args, **kw})).eval()


def small_mixer(**kw):
    args = dict(num_classes=5, img_size=32, patch_size=8, num_blocks=3, embed_dim=32)
    return trained_looking(MlpMixer(**{**args, **kw})).eval()


def small_convmixer(**kw):
    args = dict(dim=16, depth=3, kernel_size=3, patch_size=4, num_classes=6)
    model = trained_looking(ConvMixer(**{**args, **kw}))
    # Trained-looking BatchNorm statistics, different in every block.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


MODELS = {
    "vit": lambda: small_vit(),
    "vit-avgpool": lambda: small_vit(global_pool="avg", class_token=False, fc_norm=True),
    "vit-layerscale-registers": lambda: small_vit(
        init_values=1e-2, reg_tokens=2, no_embed_class=True
    ),
    "deit3": lambda: trained_looking(
        timm.create_model(
            "deit3_small_patch16_224",
            img_size=32,
            patch_size=8,
            embed_dim=48,
            depth=3,
            num_heads=3,
            num_classes=7,
        )
    ).eval(),
    "mixer": lambda: small_mixer(),
    "resmlp": lambda: small_mixer(block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4),
    "gmlp": lambda: small_mixer(block_layer=SpatialGatingBlock, mlp_layer=GatedMlp, mlp_ratio=6),
    "convmixer": lambda: small_convmixer(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_gives_timm_logits(name):
    timm_model = MODELS[name]()
    net = modnet.from_timm(timm_model).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), timm_model(x), rtol=0, atol=1e-6)


TRAIN_MODELS = {
    "vit": lambda: small_vit(
        drop_path_rate=0.5,
        drop_rate=0.3,
        proj_drop_rate=0.1,
        attn_drop_rate=0.1,
        pos_drop_rate=0.1,
    ),
    "deit3": lambda: small_vit(drop_path_rate=0.4, init_values=1e-2, no_embed_class=True),
    "resmlp": lambda: small_mixer(
        block_layer=ResBlock, norm_layer=Affine, mlp_ratio=4, drop_path_rate=0.3, drop_rate=0.2
    ),
    "convmixer": lambda: small_convmixer(drop_rate=0.2),
}


@pytest.mark.parametrize("name", list(TRAIN_MODELS))
def test_training_mode_outputs_and_gradients_match_under_the_same_seed(name):
    timm_model = TRAIN_MODELS[name]().train()
    net = modnet.from_timm(timm_model).train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(11)
    expected = timm_model(x)
    expected.square().mean().backward()
    torch.manual_seed(11)
    got = net(x)
    got.square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # The head's gradient sees every layer's drop-path mask: equal only if the rates match.
    torch.testing.assert_close(
        net.heads["default"].weight.grad,
        timm_model.get_classifier().weight.grad,
        rtol=0,
        atol=1e-6,
    )


def test_drop_path_rate_is_kept_per_layer_position():
    vit = small_vit(drop_path_rate=0.5, depth=4)
    net = modnet.from_timm(vit)
    expected = [float(r) for r in torch.linspace(0, 0.5, 4)]
    assert net.drop_path_rates == pytest.approx(expected)
    assert net.drop_path_rates[0] == 0.0 and net.drop_path_rates[3] == pytest.approx(0.5)


def test_convmixer_batchnorm_statistics_follow_each_layer_in_training():
    timm_model = small_convmixer().train()
    net = modnet.from_timm(timm_model).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        timm_model(x)
        net(x)
    stats = net.norm_stats["default"]
    for layer, block in enumerate(timm_model.blocks):
        mine = stats.layer(layer)
        for name, value in block.named_buffers():
            torch.testing.assert_close(mine[name], value, rtol=0, atol=1e-6)
    stem = stats.trunk()["model.stem.2.running_mean"]
    torch.testing.assert_close(stem, timm_model.stem[2].running_mean, rtol=0, atol=1e-6)


def test_vit_tiny_from_timm_registry_matches():
    vit = timm.create_model("vit_tiny_patch16_224").eval()
    net = modnet.from_timm(vit, task="imagenet").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x, task="imagenet"), vit(x), rtol=0, atol=1e-5)
    assert net.pool.num_templates == net.depth == 12
    assert net.routes["imagenet"].extra_repr() == f"indices={list(range(12))}"


def _roundtrip(net, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net.eval()(x)
        io.save_model(net, tmp_path / "m")
        loaded, _ = io.load_model(tmp_path / "m")
        return before, loaded(x), loaded


def test_converted_by_name_saves_and_loads_with_identical_logits(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)
    net = modnet.from_timm("deit3_small_patch16_224", drop_path_rate=0.2, **kwargs)
    before, after, loaded = _roundtrip(net, tmp_path)
    assert torch.equal(before, after)
    assert loaded.config["architecture"] == "deit3_small_patch16_224"
    assert loaded.drop_path_rates == net.drop_path_rates


def test_converted_module_with_its_arguments_saves_and_loads(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, num_classes=3)
    vit = timm.create_model("vit_tiny_patch16_224", **kwargs)
    net = modnet.from_timm(vit, **kwargs)
    before, after, _ = _roundtrip(net, tmp_path)
    assert torch.equal(before, after)


def test_timm_eval_transform_gives_the_converted_model_its_sources_pixels(tmp_path):
    # img_size stays 224: timm's pretrained_cfg keeps 224 whatever size a model is built for
    kwargs = dict(patch_size=32, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kwargs)
    net = modnet.from_timm(deit, **kwargs)
    io.save_model(net, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m")
    expected = resolve_model_data_config(deit)
    assert (expected["interpolation"], expected["crop_pct"]) == ("bicubic", 0.9)  # not modnet's
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    pixels = create_transform(**expected)(image)
    for model in (net, loaded):
        config = resolve_model_data_config(model)
        keys = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "input_size")
        assert {k: config[k] for k in keys} == {k: expected[k] for k in keys}
        assert torch.equal(create_transform(**config)(image), pixels)
        # the converted task keeps its source's head: the cfg says so
        assert model.pretrained_cfg["num_classes"] == model.num_classes == 7
    net.reset_classifier(0)
    assert net.pretrained_cfg["num_classes"] == net.num_classes == 0


def test_modnet_models_and_old_checkpoints_keep_bilinear_without_a_crop(tmp_path):
    native = resolve_model_data_config(timm.create_model("modnet_vit_tiny", num_classes=5))
    assert (native["interpolation"], native["crop_pct"]) == ("bilinear", 1.0)
    kwargs = dict(patch_size=32, embed_dim=48, depth=2, num_heads=3)
    io.save_model(modnet.from_timm("deit_tiny_patch16_224", **kwargs), tmp_path / "m")
    # a converted model saved before it kept its source's preprocessing was evaluated
    # with modnet's defaults, which its manifest records: it loads with them
    path = tmp_path / "m" / io.MANIFEST
    manifest = json.loads(path.read_text())
    manifest["pretrained_cfg"].update(interpolation="bilinear", crop_pct=1.0)
    manifest["pretrained_cfg"].pop("crop_mode", None)
    path.write_text(json.dumps(manifest))
    config = resolve_model_data_config(io.load_model(tmp_path / "m")[0])
    assert (config["interpolation"], config["crop_pct"]) == ("bilinear", 1.0)


def test_model_that_timm_cannot_recreate_by_name_is_refused_at_load(tmp_path):
    net = modnet.from_timm(small_convmixer())
    with pytest.warns(UserWarning, match=r"from_timm\('<timm model name>', \*\*kwargs\)"):
        io.save_model(net, tmp_path / "m")
    with pytest.raises(io.CheckpointError, match="cannot recreate by name"):
        io.load_model(tmp_path / "m")


def test_saving_a_model_load_model_cannot_rebuild_warns_how_to_make_it_loadable(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, depth=2, num_classes=3)
    vit = timm.create_model("vit_tiny_patch16_224", **kwargs)
    with pytest.warns(UserWarning) as record:
        io.save_model(modnet.from_timm(vit), tmp_path / "m")
    assert [str(w.message) for w in record] == [
        f"{tmp_path / 'm'} is saved, but modnet.io.load_model cannot rebuild it: it was "
        "converted from a vit_tiny_patch16_224 that timm.create_model cannot recreate by "
        "name; convert it with modnet.from_timm('vit_tiny_patch16_224', **kwargs), kwargs "
        "being the timm.create_model arguments it was made with, to make it loadable"
    ]
    assert record[0].filename == __file__  # points at the caller's save_model line
    assert (tmp_path / "m" / "manifest.json").is_file()  # saved all the same
    with pytest.raises(io.CheckpointError, match="cannot rebuild this model"):
        io.load_model(tmp_path / "m")
    # the fix it names: the same module with its arguments saves quietly and loads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.save_model(modnet.from_timm(vit, **kwargs), tmp_path / "fixed")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(io.load_model(tmp_path / "fixed")[0](x), vit.eval()(x))


def test_wrong_arguments_for_a_module_are_not_trusted(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3)
    net = modnet.from_timm(vit, img_size=32, patch_size=16)  # not how it was made
    assert net.config["timm_kwargs"] is None


def test_conversion_leaves_the_timm_model_untouched():
    vit = small_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    net = modnet.from_timm(vit)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert len(vit.blocks) == 3
    for key, value in vit.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_headless_timm_model_converts_to_features():
    vit = small_vit(num_classes=0)
    net = modnet.from_timm(vit).eval()
    assert net.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), vit(x), rtol=0, atol=1e-6)


def test_new_task_on_converted_model_can_reorder_pretrained_blocks():
    vit = small_vit()
    net = modnet.from_timm(vit).eval()
    net.add_task("reversed", 4, route=[2, 1, 0])
    blocks = vit.blocks
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        h = vit.norm(blocks[0](blocks[1](blocks[2](h))))
        expected = net.heads["reversed"](vit.forward_head(h, pre_logits=True))
        torch.testing.assert_close(net(x, task="reversed"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, match",
    [
        ("resnet10t", "cannot convert this ResNet faithfully"),
        ("deit_tiny_distilled_patch16_224", "VisionTransformerDistilled"),
    ],
)
def test_unsupported_models_are_refused_clearly(name, match):
    with pytest.raises(ConfigError, match=match):
        modnet.from_timm(timm.create_model(name, num_classes=3))


def test_blocks_that_differ_are_refused():
    vit = small_vit()
    vit.blocks[1].mlp.act = torch.nn.ReLU()
    with pytest.raises(ConfigError, match="block 1 .* differs from block 0"):
        modnet.from_timm(vit)


def test_registered_convmixer_saves_and_loads_with_identical_logits(tmp_path):
    net = modnet.from_timm("convmixer_768_32", num_classes=3).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = net(x)
        io.save_model(net, tmp_path / "m")
        loaded, _ = io.load_model(tmp_path / "m")
        assert torch.equal(loaded(x), before)


def test_converted_model_with_a_new_pooling_saves_and_loads(tmp_path):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=4)
    net = modnet.from_timm("vit_tiny_patch16_224", **kwargs)
    net.reset_classifier(0, "avg")
    before, after, loaded = _roundtrip(net, tmp_path)
    assert torch.equal(before, after)
    assert loaded.trunk.model.global_pool == "avg"


@pytest.mark.parametrize(
    "kwargs",
    [dict(img_size=64), dict(reg_tokens=4), dict(dynamic_img_size=True)],
    ids=["img_size", "reg_tokens", "dynamic_img_size"],
)
def test_arguments_that_repr_does_not_show_still_count_as_not_recreatable(tmp_path, kwargs):
    # a position embedding's size, register tokens and dynamic_img_size are not in the
    # model's repr: a model made with them used to save quietly, then fail to load
    # (img_size, reg_tokens) or load without the option (dynamic_img_size)
    vit = timm.create_model("vit_tiny_patch16_224", **kwargs)
    with pytest.warns(UserWarning, match="load_model cannot rebuild it"):
        io.save_model(modnet.from_timm(vit), tmp_path / "m")
    with pytest.raises(io.CheckpointError, match="cannot rebuild this model"):
        io.load_model(tmp_path / "m")
    # settings a built model takes without becoming another one still recreate it
    plain = timm.create_model("vit_tiny_patch16_224").eval()
    plain.set_grad_checkpointing(True)
    assert modnet.from_timm(plain).config["timm_kwargs"] == {}


@pytest.mark.parametrize("name", ["vit", "vit-layerscale-registers", "deit3", "mixer"])
@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
def test_intermediates_with_prefix_tokens_are_timms(name, output_fmt):
    """``return_prefix_tokens``: (spatial, prefix) pairs for ViTs, a plain list for
    models without prefix tokens, equal to timm's own ``forward_intermediates``."""
    timm_model = MODELS[name]()
    net = modnet.from_timm(timm_model).eval()
    x = torch.randn(2, 3, 32, 32)
    kwargs = dict(indices=2, norm=True, output_fmt=output_fmt, intermediates_only=True)
    with torch.no_grad():
        ours = net.forward_intermediates(x, return_prefix_tokens=True, **kwargs)
        # timm's Mixer has no prefix tokens and no such option
        prefix = {} if name == "mixer" else dict(return_prefix_tokens=True)
        theirs = timm_model.forward_intermediates(x, **prefix, **kwargs)
    assert len(ours) == len(theirs) == 2
    assert net.num_prefix_tokens == getattr(timm_model, "num_prefix_tokens", 0)
    for a, b in zip(ours, theirs, strict=True):
        assert isinstance(a, tuple) == isinstance(b, tuple) == (name != "mixer")
        pairs = zip(a, b, strict=True) if isinstance(a, tuple) else [(a, b)]
        for x_ours, x_theirs in pairs:
            torch.testing.assert_close(x_ours, x_theirs, rtol=0, atol=1e-6)
