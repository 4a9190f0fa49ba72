"""timm.create_model refuses, in one line and before building, options that used to
fail deep inside timm's builder or build a model that silently did something else."""

import numpy as np
import pytest
import timm
import torch

import modnet  # noqa: F401  (registers the models)
from modnet.errors import ConfigError

CONV = dict(width=8, depth=4, img_size=16, num_templates=3, exp_ratio=2.0)
VIT = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, depth=4, num_templates=3)


@pytest.mark.parametrize(
    "family, options, message",
    [
        ("conv", dict(width=0), "model option width must be >= 1, got 0"),
        ("conv", dict(width=2.5), "model option width must be an integer, got 2.5"),
        ("conv", dict(exp_ratio=0), "model option exp_ratio must be > 0, got 0"),
        ("conv", dict(in_chans=0), "model option in_chans must be >= 1, got 0"),
        ("conv", dict(num_templates=0), "model option num_templates must be >= 1, got 0"),
        ("vit", dict(embed_dim=0), "model option embed_dim must be >= 1, got 0"),
        ("vit", dict(mlp_ratio=0), "model option mlp_ratio must be > 0, got 0"),
        ("conv", dict(depth=2.5), "depth must be a whole number of layers >= 1, got 2.5"),
        (
            "vit",
            dict(img_size=18),
            "img_size=18 must be divisible by patch_size=4: choose img_size as a multiple of "
            "patch_size",
        ),
        (
            "vit",
            dict(img_size=(16, 18)),
            "img_size=(16, 18) must be divisible by patch_size=4: choose img_size as a "
            "multiple of patch_size",
        ),
        (
            "conv",
            dict(tasks=["a", "b"]),
            "tasks must map each task's name to its number of classes, e.g. tasks={'a': 10, "
            "'b': 5}; got a list: ['a', 'b']",
        ),
        (
            "conv",
            dict(route="hard", anisotropic=True),
            "anisotropic=True gives a soft route one coefficient per parameter tensor, and a "
            "hard route selects whole templates: leave anisotropic out, or choose a soft route",
        ),
        ("conv", dict(anisotropic="yes"), "anisotropic must be True or False, got 'yes'"),
        (
            "conv",
            dict(route_init="foo"),
            "unknown route_init 'foo': choose one of random, uniform, cyclic",
        ),
        (
            "conv",
            dict(route="hyper", route_init="cyclic"),
            "route_init='cyclic' sets soft routes' initial logits, and the route is hyper: "
            "choose a soft route or leave route_init out",
        ),
    ],
)
def test_bad_model_options_are_one_line_errors(family, options, message):
    base = CONV if family == "conv" else VIT
    with pytest.raises(ConfigError) as error:
        timm.create_model(f"modnet_{family}_tiny", **{**base, **options})
    assert str(error.value) == message


def test_integer_likes_and_checked_lists_still_build():
    model = timm.create_model("modnet_conv_tiny", **{**CONV, "depth": np.int64(3)})
    assert model.depth == 3 and isinstance(model.depth, int)
    rates = [0.0, 0.05, 0.1]
    model = timm.create_model("modnet_conv_tiny", **{**CONV, "depth": 3, "drop_path_rate": rates})
    assert list(model.drop_path_rates) == rates
    vit = timm.create_model("modnet_vit_tiny", **{**VIT, "img_size": (16, 20)})
    assert vit.pretrained_cfg["input_size"] == (3, 16, 20)


@pytest.mark.parametrize(
    "family, options",
    [
        ("conv", dict(width=np.int64(8), num_templates=np.int32(3), in_chans=np.int64(3))),
        ("conv", dict(width=torch.tensor(8))),
        ("conv", dict(drop_path_rate=(0.0, 0.1, 0.2, 0.3))),
        ("conv", dict(drop_path_rate=np.array([0.0, 0.1, 0.2, 0.3]))),
        ("vit", dict(embed_dim=np.int64(32), patch_size=np.int64(4))),
        ("vit", dict(mlp_ratio=np.float32(2.0))),
        ("vit", dict(mlp_ratio=torch.tensor(2.0))),
    ],
)
def test_numpy_and_tensor_numbers_and_per_layer_tuples_build_as_in_timm(family, options):
    base = CONV if family == "conv" else VIT
    model = timm.create_model(f"modnet_{family}_tiny", tasks={"a": 2}, **{**base, **options})
    x = torch.randn(1, 3, 16, 16)
    assert model(x).shape == (1, 2)
