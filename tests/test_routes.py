"""Routes: soft and hard routes agree, and a hard route is exactly a plain stack."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import modnet
from modnet.errors import ConfigError
from modnet.families.conv import make_inverted_residual
from tests.conftest import images, tiny_conv, tiny_vit


def one_hot(indices, count, tensors=0):
    c = torch.nn.functional.one_hot(torch.tensor(indices), count).float()
    return c.unsqueeze(-1).repeat(1, 1, tensors) if tensors else c


def test_one_hot_soft_route_equals_hard_route():
    for build in (tiny_conv, tiny_vit):
        model = build(tasks={"soft": 3, "hard": 3}).eval()
        order = [2, 0, 0, 1]
        model.set_route("hard", order)
        model.set_route("soft", one_hot(order, 3))
        model.heads["soft"].load_state_dict(model.heads["hard"].state_dict())
        x = images(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x, "soft"), model(x, "hard"), rtol=0, atol=1e-6)


def test_one_hot_anisotropic_route_equals_hard_route():
    model = tiny_conv(tasks={"aniso": 3, "hard": 3}, anisotropic=True).eval()
    order = [1, 2, 0, 1]
    model.set_route("hard", order)
    model.set_route("aniso", one_hot(order, 3, model.pool.num_tensors))
    model.heads["aniso"].load_state_dict(model.heads["hard"].state_dict())
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, "aniso"), model(x, "hard"), rtol=0, atol=1e-6)


def _plain_stack_reference(blocks, order):
    """The conv family's trunk around nn.Sequential of the chosen blocks."""
    family = modnet.conv_family(num_templates=len(blocks), width=8, exp_ratio=2.0, img_size=8)
    pool = modnet.TemplatePool(blocks)
    family.pool = pool
    model = modnet.ModularNet(family, depth=max(len(order), 1), tasks={"t": 3}, route="hard")
    model.set_route("t", order)
    model.eval().set_batchnorm_folding(False)  # bit-identical: BatchNorm as timm runs it
    for block in blocks:
        block.eval()
    plain = nn.Sequential(*[blocks[i] for i in order])

    def reference(x):
        trunk = model.trunk
        return model.heads["t"](trunk.pre_logits(trunk.norm(plain(trunk.embed(x)))))

    return model, reference


def test_identity_hard_route_with_k_equal_l_is_a_plain_stack():
    blocks = [make_inverted_residual(8, 2.0, "relu6") for _ in range(4)]
    for block in blocks:  # non-trivial residual branches
        nn.init.normal_(block.bn3.weight)
    model, reference = _plain_stack_reference(blocks, [0, 1, 2, 3])
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@settings(max_examples=15, deadline=None)
@given(order=st.lists(st.integers(0, 2), min_size=1, max_size=6))
def test_any_hard_route_with_repeats_and_skips_is_a_plain_stack(order):
    torch.manual_seed(1)
    blocks = [make_inverted_residual(8, 2.0, "relu6") for _ in range(3)]
    for block in blocks:
        nn.init.normal_(block.bn3.weight)
    model, reference = _plain_stack_reference(blocks, order)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        # folded (the default in inference): the same within float rounding
        folded = model.set_batchnorm_folding(True)(x)
    torch.testing.assert_close(folded, reference(x), rtol=1e-5, atol=1e-6)


def test_pool_mix_is_the_weighted_sum_of_templates():
    model = tiny_conv(num_classes=2)
    pool = model.pool
    coefficients = torch.randn(4, 3)
    mixed = pool.mix(coefficients)
    for name in pool.tensor_names:
        templates = pool.stacked(name)
        for layer in range(4):
            expected = sum(coefficients[layer, k] * templates[k] for k in range(3))
            torch.testing.assert_close(mixed[name][layer], expected, rtol=1e-5, atol=1e-6)


def test_softmax_route_is_convex_and_linear_route_is_free():
    model = tiny_conv(tasks={"s": 2})
    coefficients = model.routes["s"].plan().coefficients
    torch.testing.assert_close(coefficients.sum(1), torch.ones(4))
    assert (coefficients >= 0).all()
    linear = tiny_conv(tasks={"l": 2}, route="linear")
    with torch.no_grad():
        linear.routes["l"].logits.fill_(-2.0)
    assert torch.equal(linear.routes["l"].plan().coefficients, torch.full((4, 3), -2.0))


def test_hypernetwork_route_shapes_and_task_embeddings_differ():
    model = tiny_conv(tasks={"a": 2, "b": 2}, route="hyper", hyper_dim=5, hyper_hidden=16)
    ca = model.routes["a"].plan(model.hypernet).coefficients
    cb = model.routes["b"].plan(model.hypernet).coefficients
    assert ca.shape == cb.shape == (4, 3)
    assert not torch.equal(ca, cb)
    aniso = tiny_conv(tasks={"a": 2}, route="hyper", anisotropic=True)
    plan = aniso.routes["a"].plan(aniso.hypernet)
    assert plan.coefficients.shape == (4, 3, aniso.pool.num_tensors)


HYPER_ROUTE_MISFITS = [
    (
        dict(embed_dim=3),
        "the hyper route for task 'new' has embed_dim=3 but the model's hypernetwork takes "
        "embeddings of size 5 (hyper_dim): build it with embed_dim=5",
    ),
    (
        dict(depth=2),
        "the hyper route for task 'new' has 2 layers but the model has depth 4: build it "
        "with depth=4",
    ),
    (
        dict(hyper_templates=2),
        "the hyper route for task 'new' has hyper_templates=2 but the model's hypernetwork "
        "gives coefficients for 3 templates: build it with hyper_templates=3",
    ),
    (
        dict(num_tensors=9),
        "the hyper route for task 'new' has num_tensors=9 but the model's hypernetwork gives "
        "one coefficient per (layer, template), the model being isotropic: build it with "
        "num_tensors=1",
    ),
    (
        dict(route="softmax"),
        "the route for task 'new' is a HyperRoute, but this model's routes are softmax and it "
        "has no hypernetwork to run it: build the model with route='hyper', or give "
        "coefficients [L, K] or a SoftRoute",
    ),
]


@pytest.mark.parametrize(
    "change, message",
    HYPER_ROUTE_MISFITS,
    ids=["embed_dim", "depth", "hyper_templates", "num_tensors", "no_hypernetwork"],
)
def test_a_hyper_route_that_does_not_fit_the_hypernetwork_is_refused_before_it_is_kept(
    change, message
):
    options = dict(route="hyper", hyper_dim=5)
    if change.get("route") == "softmax":
        options = {}
    model = tiny_conv(tasks={"a": 3}, **options).eval()
    fields = dict(embed_dim=5, depth=4, num_templates=3, hyper_templates=3, num_tensors=1)
    fields.update({k: v for k, v in change.items() if k != "route"})
    route = modnet.HyperRoute(**fields)
    x = images(model)
    with torch.no_grad():
        before = model(x, task="a")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        model.add_task("new", 3, route=route)
    assert str(error.value) == message
    assert model.task_names == ["a"]
    with pytest.raises(ValueError) as error:
        model.set_route("a", route)
    assert str(error.value) == message.replace("'new'", "'a'")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x, task="a"), before)
    if options:  # the same route with the hypernetwork's own fields is kept and runs
        model.add_task("new", 3, route=modnet.HyperRoute(5, 4, 3, 3))
        assert model.routes["new"].spec()["depth"] == 4
        assert model(x, task="new").shape == (4, 3)


def test_export_bakes_a_soft_route_into_a_plain_network():
    for build in (tiny_conv, tiny_vit):
        model = build(tasks={"a": 3, "b": 4}).eval()
        exported = model.export("b")
        assert not any(isinstance(m, modnet.TemplatePool) for m in exported.modules())
        assert len(exported.blocks) == model.depth
        x = images(model)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x, "b"), rtol=1e-5, atol=1e-6)


def test_saved_export_loads_with_torch_alone_at_any_batch_size(tmp_path):
    from modnet.export import save_exported

    for build in (tiny_conv, tiny_vit):
        model = build(tasks={"a": 3}).eval()
        path = save_exported(model.export("a"), tmp_path / f"{build.__name__}.pt2")
        program = torch.export.load(str(path)).module()
        x = images(model, batch=5)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x, "a"), rtol=1e-5, atol=1e-6)


def test_saved_exports_never_replace_a_file_unless_told(tmp_path):
    from modnet.export import load_safe, save_exported, save_safe

    model = tiny_conv(tasks={"a": 3}).eval()
    net = model.export("a")
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "config.json").write_text("mine")
    with pytest.raises(ConfigError) as error:
        save_safe(net, model.config, folder)
    assert str(error.value) == (
        f"{folder / 'config.json'} already exists: choose another directory, or pass "
        "overwrite=True to replace it"
    )
    assert [p.name for p in folder.iterdir()] == ["config.json"]
    assert (folder / "config.json").read_text() == "mine"
    assert save_safe(net, model.config, folder, overwrite=True) == folder
    x = images(model)
    with torch.no_grad():
        assert torch.equal(load_safe(folder)(x), net(x))
    with pytest.raises(ConfigError) as error:  # both files named, nothing written
        save_safe(model.export("a"), model.config, folder)
    assert str(error.value) == (
        f"{folder / 'model.safetensors'} and config.json already exist: choose another "
        "directory, or pass overwrite=True to replace them"
    )
    mine = tmp_path / "mine.pt2"
    mine.write_text("mine")
    with pytest.raises(ConfigError) as error:
        save_exported(net, mine)
    assert str(error.value) == (
        f"{mine} already exists: choose another path, or pass overwrite=True to replace it"
    )
    assert mine.read_text() == "mine"
    for overwrite in (False, True):  # a folder is no file to replace, whatever is asked
        with pytest.raises(ConfigError, match=rf"^{folder} is a folder: give the .pt2 file"):
            save_exported(net, folder, overwrite=overwrite)


def test_a_task_without_a_head_saves_safely_and_loads_the_same_features(tmp_path):
    from modnet.export import load_safe, save_safe

    created = tiny_conv(tasks={"a": 3, "h": 0}).eval()
    reset = tiny_vit(tasks={"a": 3, "h": 5}).eval()
    reset.reset_classifier(0, task="h")
    for model in (created, reset):
        folder = save_safe(model.export("h"), model.config, tmp_path / model.config["family"])
        net = load_safe(folder)
        assert isinstance(net.head, nn.Identity)
        x = images(model)
        with torch.no_grad():
            features = model(x, "h")
            assert features.shape == (4, model.num_features)
            assert torch.equal(net(x), features)
