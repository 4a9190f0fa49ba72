"""modnet models behave like timm models: registry, create_model, forward_* and cfg."""

import copy

import pytest
import timm
import torch

import modnet
from tests.conftest import TINY_CONV, images, moved_off_init, tiny_conv, tiny_vit


def test_models_are_registered_with_timm():
    names = timm.list_models("modnet_*")
    for name in ["modnet_conv_tiny", "modnet_conv_small", "modnet_vit_tiny", "modnet_vit_small"]:
        assert name in names


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_forward_features_and_head_compose_to_forward(build):
    model = build(tasks={"a": 5}).eval()
    x = images(model)
    features = model.forward_features(x, task="a")
    pooled = model.forward_head(features, task="a", pre_logits=True)
    logits = model.forward_head(features, task="a")
    assert pooled.shape == (4, model.num_features)
    assert logits.shape == (4, 5)
    assert torch.equal(logits, model(x, task="a"))


def test_num_classes_creates_a_single_default_task():
    model = tiny_conv(num_classes=7)
    assert model.task_names == ["default"]
    assert model.num_classes == 7
    assert model(images(model)).shape == (4, 7)


def test_reset_classifier_replaces_one_task_head():
    model = tiny_conv(tasks={"a": 3, "b": 4})
    model.reset_classifier(9, task="b")
    assert model.task_classes == {"a": 3, "b": 9}
    assert model(images(model), task="b").shape == (4, 9)


def test_default_cfg_describes_the_input():
    model = tiny_conv(in_chans=1, num_classes=2)
    assert model.default_cfg["input_size"] == (1, 8, 8)
    assert timm.data.resolve_data_config(model=model)["input_size"] == (1, 8, 8)


def test_dtype_kwarg_builds_in_that_dtype():
    model = tiny_conv(num_classes=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(images(model).double()).dtype == torch.float64


def test_pretrained_weights_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("modnet_conv_tiny", pretrained=True, **TINY_CONV)


def test_parameter_groups_partition_the_parameters():
    model = tiny_conv(tasks={"a": 3, "b": 2}, route="hyper")
    groups = model.parameter_groups()
    ids = [id(p) for group in groups.values() for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_package_exports_the_api():
    for name in ["ModularNet", "TemplatePool", "SoftRoute", "HardRoute", "from_timm"]:
        assert hasattr(modnet, name)


def _two_tasks_with_own_stats() -> modnet.ModularNet:
    model = moved_off_init(tiny_conv(tasks={"a": 5, "b": 5}))
    x = images(model, batch=8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x, task="a")
            model(x * 2 + 1, task="b")
    return model.eval()


def _logits(model: modnet.ModularNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {task: model(x, task=task) for task in model.task_names}


@pytest.mark.parametrize("swap", ["convert_sync_batchnorm", "freeze_trunk"])
def test_timm_module_swaps_keep_each_tasks_trunk_statistics(swap, tmp_path):
    from timm.layers import convert_sync_batchnorm
    from timm.utils.model import freeze, unfreeze

    from modnet import io

    model = _two_tasks_with_own_stats()
    x = images(model, batch=8)
    before = _logits(model, x)
    assert not torch.allclose(before["a"], before["b"])  # the tasks' statistics differ
    if swap == "convert_sync_batchnorm":
        model = convert_sync_batchnorm(model).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.trunk.modules())
        after = _logits(model, x)
        for task in model.task_names:
            assert torch.equal(after[task], before[task]), task
    else:
        freeze(model, ["trunk"])
        model.eval()
        assert "Frozen" in type(model.trunk.final_norm).__name__
        after = _logits(model, x)
        for task in model.task_names:
            # FrozenBatchNorm2d folds the statistics into a scale and shift (timm's
            # own models move by ~6e-8 too); without them the logits move by ~0.1
            torch.testing.assert_close(after[task], before[task], rtol=0, atol=1e-6)
        trained = copy.deepcopy(model).train()  # frozen trunk statistics stay as they are
        stats = {k: v.clone() for k, v in trained.state_dict().items() if "trunk__" in k}
        with torch.no_grad():
            trained(x, task="a")
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in stats.items())
        unfreeze(model, ["trunk"])
        model.eval()
        after = _logits(model, x)
        for task in model.task_names:
            assert torch.equal(after[task], before[task]), task
    io.save_model(model, tmp_path / "saved")
    loaded, _ = io.load_model(tmp_path / "saved")
    reloaded = _logits(loaded, x)
    for task in model.task_names:
        assert torch.equal(reloaded[task], before[task]), task
