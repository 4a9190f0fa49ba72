"""The model's Python API keeps its promises after changes: added tasks, growth, loads.

A task added to a converted model runs in its dtype; only the tasks ``set_trainable``
names move their statistics; ``grow`` refuses a bad ``init`` before it changes the
pool; ``load_state_dict`` refuses a hard route no forward could run; parameters made
after ``set_trainable`` follow its selection.
"""

import copy

import pytest
import torch

from modnet.routing import SoftRoute
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit

ROUTES = ["hyper", "softmax", "linear", "sparsemax", "hard"]


# ------------------------------------------------------------------ dtype of new tasks
@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_task_added_to_a_converted_model_takes_its_dtype(build, route, dtype):
    model = build(tasks={"a": 3}, route=route).to(dtype).eval()
    model.add_task("b", 2)
    model.add_task("c", 2, init_from="a")
    for task in ("b", "c"):
        floats = [t for t in model.routes[task].state_dict().values() if t.is_floating_point()]
        assert all(t.dtype == dtype for t in floats)
    x = images(model, 4).to(dtype)
    alone = model(x, task="b")
    assert alone.dtype == dtype
    mixed = model(x, task=[1, 0, 1, 0])
    assert mixed.dtype == dtype and torch.isfinite(mixed[:, :2]).all()


def test_a_float32_route_given_to_a_float64_model_keeps_every_digit():
    model = tiny_conv(tasks={"a": 3}, route="linear").double()
    coefficients = torch.rand(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model.add_task("b", 2, route=coefficients)
    assert torch.equal(model.routes["b"].logits, coefficients)
    model.set_route("a", SoftRoute.from_coefficients(coefficients))
    assert torch.equal(model.routes["a"].logits, coefficients)
    # a route built in float32 is cast to the model's dtype, not left behind
    model.add_task("c", 2, route=SoftRoute(4, 3, normalize="softmax"))
    assert model.routes["c"].logits.dtype == torch.float64
    configured = model.routes["a"].configured(normalize="softmax", temperature=0.5)
    assert torch.equal(configured.logits, coefficients)


# ------------------------------------------------------------------------------ grow
def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


@pytest.mark.parametrize(
    ("count", "init", "message"),
    [
        (1.5, "random", r"^grow needs count as a whole number, got 1\.5$"),
        (True, "random", r"^grow needs count as a whole number, got True$"),
        (0, "random", r"^grow needs count >= 1 \(templates to add\), got 0$"),
        (1, True, r"^grow needs init as 'random', 'mean' or a template index, got True$"),
        (1, 1.0, r"^grow needs init as 'random', 'mean' or a template index, got 1\.0$"),
        (1, "zeros", r"^unknown init 'zeros': use 'random', 'mean' or a template index$"),
        (1, 5, r"^init=5 is not a template of the pool: it has 5 templates \(indices 0\.\.4, "),
        (1, -6, r"^init=-6 is not a template of the pool: it has 5 templates "),
    ],
)
def test_a_bad_grow_is_refused_in_one_line_before_the_pool_changes(count, init, message):
    model = tiny_conv(tasks={"a": 3})
    model.grow(2)
    before = _snapshot(model)
    for grow in (model.pool.grow, model.grow):
        with pytest.raises(ValueError, match=message):
            grow(count, init=init)
        assert model.pool.num_templates == 5 and len(model.pool.chunks) == 2
        assert _unchanged(model, before)
    x = images(model, 2)
    model.eval()(x)  # every later forward still runs


def test_grow_copies_a_template_by_any_integer_index_of_the_whole_pool():
    model = tiny_conv(tasks={"a": 3})
    model.grow(2)  # templates 3 and 4 in a second chunk
    np = pytest.importorskip("numpy")
    for init, source in [(-1, 4), (np.int64(1), 1), (torch.tensor(3), 3), (-5, 3)]:
        new = model.grow(1, init=init)
        for name in model.pool.tensor_names:
            copied = model.pool.select(new[0])[name]
            assert torch.equal(copied, model.pool.select(source)[name])


# ------------------------------------------------------------------ load_state_dict
@pytest.mark.parametrize(
    ("indices", "message"),
    [
        (
            [0, 9],
            r"^routes\.a\.indices in the state dict: route index 9 at layer 1 of task 'a' is "
            r"out of range: the pool has 3 templates \(0\.\.2\)$",
        ),
        (
            [0, 1, 2, 0, 1, 2, 0],
            r"^routes\.a\.indices in the state dict: the hard route for task 'a' has 7 "
            r"entries: it needs between 1 and 4 \(the model's depth; ",
        ),
        (
            [0.0, 1.0],
            r"^routes\.a\.indices in the state dict must be 1-D integer template indices, "
            r"got dtype torch\.float32 and shape \(2,\): ",
        ),
    ],
)
def test_a_state_dict_with_an_impossible_hard_route_is_refused_leaving_the_model(indices, message):
    model = tiny_conv(tasks={"a": 3, "b": 2}, route="hard").eval()
    x = images(model, 2)
    expected = model(x, task="a")
    before = _snapshot(model)
    state = {k: v.clone() for k, v in before.items()}
    state["routes.a.indices"] = torch.tensor(indices)
    with torch.no_grad():
        state["heads.b.weight"].add_(1.0)  # loaded before the route, were it not checked first
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(state)
    assert _unchanged(model, before)
    assert torch.equal(model(x, task="a"), expected)


def test_a_possible_hard_route_of_another_length_still_loads():
    source = tiny_conv(tasks={"a": 3}, route="hard").eval()
    source.set_route("a", [2, 2])
    target = tiny_conv(tasks={"a": 3}, route="hard").eval()
    target.load_state_dict(source.state_dict())
    x = images(source, 2)
    assert target.routes["a"].indices.tolist() == [2, 2]
    assert torch.equal(target(x), source(x))


def test_a_hard_route_loaded_alone_refuses_an_index_past_its_templates():
    model = tiny_conv(tasks={"a": 3}, route="hard")
    route = model.routes["a"]
    message = (
        r"^indices in the state dict has template 5 at layer 0, but the route uses 3 "
        r"templates \(0\.\.2\): load a state dict saved from a model with the same pool$"
    )
    with pytest.raises(ValueError, match=message):
        route.load_state_dict({"indices": torch.tensor([5])})
    assert route.indices.tolist() == [0, 1, 2, 0]


# ----------------------------------------------------------- statistics of named tasks
def _stats(model, task):
    return {k: v.clone() for k, v in model.norm_stats[task].state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _close(a, b) -> bool:
    """Equal within float32 rounding, as the other statistics checks (a grouped
    BatchNorm's fused multiply-add rounds a running mean near 0 differently)."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=1e-6) for k in a
    )


def test_set_trainable_norm_moves_only_the_named_tasks_statistics():
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 5}))
    x = images(model, 4)
    expected = model.eval()(x, task="a")  # a held task runs as in eval mode
    model.set_trainable("b", "route,head,norm").train()
    before = _stats(model, "a")
    assert torch.equal(model(x, task="a"), expected)
    assert _same(_stats(model, "a"), before)
    # the conv trunk's statistics (stem, final norm) too, through forward_intermediates
    model.forward_intermediates(x, task="a", norm=True)
    assert _same(_stats(model, "a"), before)
    b_before = _stats(model, "b")
    model(x, task="b")
    moved = _stats(model, "b")
    assert not torch.equal(
        moved["layers__bn1__running_mean"], b_before["layers__bn1__running_mean"]
    )
    assert [k for k in moved if "trunk" in k and not torch.equal(moved[k], b_before[k])]
    # freeze_norm_stats(False) lets every task's move again, as it always did
    model.freeze_norm_stats(False)
    model(x, task="a")
    assert not _same(_stats(model, "a"), before)


@pytest.mark.parametrize("mode", ["chunked", "grouped", "split"])
def test_a_mixed_batch_moves_only_the_named_tasks_statistics(mode):
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 5, "c": 2}))
    model.mixed_batches = mode
    x = images(model, 6)
    ids = torch.tensor([0, 1, 0, 1, 2, 2])
    eval_a = model.eval()(x[ids == 0], task="a")
    model.set_trainable(["b", "c"], "route,head,norm").train()
    alone = copy.deepcopy(model)
    train_b = alone(x[ids == 1], task="b")
    alone(x[ids == 2], task="c")
    before = _stats(model, "a")
    out = model(x, task=ids)
    assert _same(_stats(model, "a"), before)
    assert _close(_stats(model, "b"), _stats(alone, "b"))
    assert _close(_stats(model, "c"), _stats(alone, "c"))
    assert torch.allclose(out[ids == 0, :3], eval_a, atol=1e-5)
    assert torch.allclose(out[ids == 1], train_b, atol=1e-5)
    # every task in the batch held: one grouped call in eval mode
    assert torch.allclose(model(x[ids == 0], task=ids[ids == 0])[:, :3], eval_a, atol=1e-5)
    assert _same(_stats(model, "a"), before)


def test_reestimating_a_tasks_statistics_keeps_set_trainables_choice():
    from modnet.adapt import reestimate_norm_stats
    from modnet.data import load_task

    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 5, "c": 2}))
    model.set_trainable("b", "route,head,norm").train()
    data = load_task("synth_shape", img_size=8, train_limit=8, test_limit=4)
    reestimate_norm_stats(model, "c", data, batch_size=4, progress=False)
    before = _stats(model, "a")
    model(images(model, 4), task="a")
    assert _same(_stats(model, "a"), before)  # before the fix: every task's moved again


def test_a_task_added_after_set_trainable_norm_keeps_its_statistics():
    model = moved_off_init(tiny_conv(tasks={"a": 3}))
    model.set_trainable("a", "all").train()
    model.add_task("new", 2)
    before = _stats(model, "new")
    model(images(model, 4), task="new")
    assert _same(_stats(model, "new"), before)


# ------------------------------------------------ parameters made after set_trainable
def _trainable(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_templates_and_tasks_made_after_set_trainable_follow_it():
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 2}))
    model.set_trainable("b", "route,head")
    trained = _trainable(model)
    model.grow(1, task="b")  # b's widened logits are still b's, and still train
    model.add_task("c", 2)
    model.add_task("d", 2, init_from="b")
    assert _trainable(model) == trained == ["heads.b.bias", "heads.b.weight", "routes.b.logits"]
    assert model.routes["b"].logits.shape[1] == 4
    x = images(model, 2)
    (model(x, task="b").sum() + model(x, task="c").sum() + model(x, task="d").sum()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trained)
    # templates train with "templates" (or "new_templates"), so templates grown later do too
    model.set_trainable("b", "templates,route", first_new_chunk=None)
    model.grow(1)
    assert all(p.requires_grad for p in model.pool.chunks[-1].parameters())


def test_parameters_made_before_any_set_trainable_train_as_in_pytorch():
    model = tiny_conv(tasks={"a": 3}, route="hyper")
    model.grow(1, task="a")
    model.add_task("b", 2)
    assert all(p.requires_grad for p in model.parameters())
    # a hyper route's coefficients for grown templates train if its embedding does
    model.set_trainable("a", "route")
    model.grow(1, task="a")
    assert model.routes["a"].extra.requires_grad and model.routes["a"].extra.shape[1] == 2
    model.set_trainable("a", "head")
    model.grow(1, task="a")
    assert not model.routes["a"].extra.requires_grad
    assert not any(p.requires_grad for p in model.pool.parameters())


# ------------------------------------------------------------ misuse in one line
def test_a_task_that_is_no_name_index_or_list_is_refused_in_one_line():
    model = tiny_conv(tasks={"a": 3, "b": 2})
    x = images(model, 2)
    for task in (1.0, {"a": 1}, b"ab"):
        with pytest.raises(ValueError, match="task must be a name, an integer index, or one"):
            model(x, task=task)
    assert model(x, task=["a", "b"]).shape == (2, 3)


@pytest.mark.parametrize("make", [tiny_conv, tiny_vit])
def test_forward_head_on_input_images_names_forward_features(make):
    model = make(tasks={"a": 3})
    x = images(model, 2)
    with pytest.raises(ValueError, match=r"forward_head takes forward_features output, got a"):
        model.forward_head(x, task="a")
    features = model.forward_features(x, task="a")
    assert torch.equal(model.forward_head(features, task="a"), model(x, task="a"))


def test_intermediates_past_a_short_hard_route_name_the_route_not_the_model():
    from modnet.errors import ConfigError
    from modnet.routing import HardRoute

    model = tiny_conv(tasks={"a": 3}, route="hard")
    model.add_task("b", 2, route=HardRoute([0, 1], model.pool.num_templates))
    x = images(model, 2)
    assert len(model.forward_intermediates(x, indices=[3], task="a", intermediates_only=True)) == 1
    with pytest.raises(ConfigError) as error:
        model.forward_intermediates(x, indices=[3], task="b")
    assert str(error.value) == (
        "indices=[3] does not fit task 'b', whose route runs 2 of the model's 4 layers: give a "
        "count of last layers in 1..2 or layer positions in -2..1"
    )


def test_set_normalization_refuses_a_std_that_is_not_positive():
    from modnet.errors import ConfigError

    model = tiny_conv(tasks={"a": 3})
    for std in ([0.5, 0.0, 0.5], [0.5, -1.0, 0.5], [0.5, float("nan"), 0.5]):
        with pytest.raises(ConfigError, match="std must be positive and mean and std finite"):
            model.set_normalization("a", [0.5, 0.5, 0.5], std)
    assert "a" not in model.task_normalization


def test_a_deleted_task_leaves_set_trainables_choice():
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 5}))
    model.set_trainable(["a", "b"], "route,head,norm").train()
    model.delete_task("b")
    model.add_task("b", 5)
    before = _stats(model, "b")
    model(images(model, 4), task="b")
    assert _same(_stats(model, "b"), before)  # the new b was never chosen: held
