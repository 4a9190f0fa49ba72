"""Weight decay by role: what modnet's trainer decays, timm.optim decays too."""

import pytest
import timm.optim
import torch
from conftest import tiny_conv, tiny_vit

from modnet.train.parts import optimizer_groups

FAMILIES = {"conv": tiny_conv, "vit": tiny_vit}


def decayed(groups) -> set[int]:
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def not_decayed(groups) -> set[int]:
    return {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route", ["softmax", "hyper", "hard"])
def test_timm_optimizer_groups_the_model_as_the_trainer_does(family, route):
    model = FAMILIES[family](tasks={"a": 3, "b": 5}, route=route)
    ours = optimizer_groups(model, 1e-3, 1e-2, 1e-3, 0.05)
    timms = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert decayed(ours) == decayed(timms.param_groups)
    assert not_decayed(ours) == not_decayed(timms.param_groups)
    assert len(decayed(ours)) + len(not_decayed(ours)) == len(list(model.parameters()))


@pytest.mark.parametrize("family", FAMILIES)
def test_decay_is_decided_by_role_on_each_templates_own_shape(family):
    model = FAMILIES[family](tasks={"a": 3}, route="hyper")
    names = model.no_weight_decay()
    for name, param in model.named_parameters():
        if name.startswith("pool."):
            tensor = next(n for n in model.pool.tensor_names if name.endswith(n.replace(".", "__")))
            per_template = model.pool.tensor_shapes[tensor]
            assert (name in names) == (len(per_template) <= 1 or tensor.endswith("bias")), name
            assert param.ndim >= 2  # stacked: ndim alone would decay norm weights and biases
        elif name.startswith(("routes.", "hypernet.")):
            assert name in names, name
        elif name.startswith("heads."):
            assert (name in names) == name.endswith("bias"), name
    # conv templates end in a zero-initialised BatchNorm weight (the identity block): never decayed
    if family == "conv":
        assert "pool.chunks.0.bn3__weight" in names
    else:
        assert {"trunk.model.pos_embed", "trunk.model.cls_token"} <= names


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_groups_a_task_like_the_same_task_exported_as_a_plain_network(family):
    model = FAMILIES[family](tasks={"a": 3, "b": 4})
    model.set_trainable("a", "all")
    exported = model.export("a")
    plain = timm.optim.create_optimizer_v2(exported, "adamw", lr=1e-3, weight_decay=0.05)
    ours = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)

    def roles(module, groups, rename):
        names = {id(p): n for n, p in module.named_parameters()}
        return {
            (rename(names[id(p)]), g["weight_decay"] > 0)
            for g in groups
            for p in g["params"]
            if rename(names[id(p)]) is not None
        }

    def block_of(name):  # "blocks.3.bn1.weight" -> "block.bn1.weight"
        if name.startswith("blocks."):
            return "block." + name.split(".", 2)[2]
        return name.replace("head.", "heads.a.")

    def template_of(name):  # "pool.chunks.0.bn1__weight" -> "block.bn1.weight"
        if name.startswith("pool."):
            return "block." + name.split(".", 3)[3].replace("__", ".")
        return None if name.startswith("routes.") else name

    assert roles(exported, plain.param_groups, block_of) == roles(
        model, ours.param_groups, template_of
    )


def test_trainer_groups_carry_their_learning_rates():
    model = tiny_conv(tasks={"a": 3})
    groups = {g["name"]: g for g in optimizer_groups(model, 1e-3, 1e-2, 5e-3, 0.05)}
    assert groups["routes"]["lr"] == 1e-2 and groups["routes"]["weight_decay"] == 0
    assert groups["heads"]["lr"] == groups["head_biases"]["lr"] == 5e-3
    assert [p.ndim for p in groups["heads"]["params"]] == [2]
    stacked = [p for p in groups["no_decay"]["params"] if p.ndim == 2]  # [K, C] norm and bias
    assert len(stacked) == 6 and len(groups["decay"]["params"]) == 4  # 3 convs and the stem
    torch.optim.AdamW(list(groups.values()))  # a valid optimizer


def test_group_matcher_puts_the_stem_first_and_templates_in_one_group():
    model = tiny_vit(tasks={"a": 3})
    groups = timm.models.group_parameters(model, model.group_matcher())
    ordered = list(groups.values())
    assert set(ordered[0]) == {
        "trunk.model.cls_token",
        "trunk.model.pos_embed",
        "trunk.model.patch_embed.proj.weight",
        "trunk.model.patch_embed.proj.bias",
    }
    assert set(ordered[1]) == {n for n, _ in model.pool.named_parameters(prefix="pool")}
    assert {"routes.a.logits", "heads.a.weight", "trunk.model.norm.weight"} <= set(ordered[2])
    assert len(ordered) == 3


def test_set_trainable_freezes_everything_else_and_checks_its_input():
    model = tiny_conv(tasks={"a": 3, "b": 3})
    model.set_trainable("b", "route,head")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"routes.b.logits", "heads.b.weight", "heads.b.bias"}
    assert model.norm_stats_frozen
    model.set_trainable(["a", "b"], ["all"])
    assert all(p.requires_grad for p in model.parameters()) and not model.norm_stats_frozen
    with pytest.raises(ValueError, match="unknown part 'routs' to train"):
        model.set_trainable("a", "routs")
    with pytest.raises(ValueError, match="new_templates can train only after growing"):
        model.set_trainable("a", "new_templates")
    with pytest.raises(KeyError, match="unknown task 'c'"):
        model.set_trainable("c", "route")
    # a part the model does not have is refused, not silently left frozen
    with pytest.raises(ValueError, match="no hypernetwork .* train its routes instead"):
        model.set_trainable("a", "hypernet")
    # while "all", spelt out or not, means what the model has (as training passes it)
    for everything in (model.ALL_PARTS, sorted(model.ALL_PARTS), "all"):
        model.set_trainable(["a", "b"], everything)
        assert all(p.requires_grad for p in model.parameters()) and not model.norm_stats_frozen
    assert trained == {
        n for n, p in model.set_trainable("b", "route,head").named_parameters() if p.requires_grad
    }
