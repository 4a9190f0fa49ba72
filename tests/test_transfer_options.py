"""transfer's starting points: the nearest source, a uniform route, an anisotropic route.

One tiny pool learns ``synth_color-bg`` (textured backgrounds) and ``synth_size``
(plain grey backgrounds); a new task drawn from one of the two domains must find
that domain's task as its nearest source, without its labels.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from modnet import io
from modnet.cli import main
from modnet.errors import ConfigError, RunDirError
from modnet.plot import read_metrics
from modnet.train import TrainConfig, train, transfer
from modnet.train.api import nearest_source
from modnet.train.parts import parse_parts
from tests.conftest import images, tiny_train_config

pytestmark = pytest.mark.slow  # trains a real (tiny) pool

TINY = dict(depth=4, width=12, exp_ratio=2.0, img_size=16, num_templates=3)
SOURCES = ["synth_color-bg", "synth_size"]


def config(**overrides) -> TrainConfig:
    values = dict(tasks=SOURCES, train_limit=320, test_limit=64, epochs=1)
    return tiny_train_config(TINY, **{**values, **overrides})


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pool") / "run"
    train(config(epochs=2), run_dir)
    return run_dir


@pytest.fixture
def run(pool, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(pool, copy)
    return copy


def _results(run_dir, task):
    return json.loads((run_dir / "results.json").read_text())[f"transfer-{task}"]


@pytest.mark.parametrize(
    ("target", "nearest"), [("synth_shape-bg", "synth_color-bg"), ("synth_shape", "synth_size")]
)
def test_init_from_nearest_picks_the_task_of_the_same_domain(run, target, nearest):
    result = transfer(run, target, parts="head", init_from="nearest", config=config())
    recorded, checkpoint = _results(run, target), io.latest_checkpoint(run)
    assert recorded["init_from"] == "nearest" and recorded["nearest"] == nearest
    assert set(recorded["source_distances"]) == set(SOURCES)
    assert min(recorded["source_distances"].values()) == recorded["source_distances"][nearest]
    chosen, distances = nearest_source(run, target, config())  # the same choice, read-only
    assert chosen == nearest and distances == pytest.approx(recorded["source_distances"])
    assert io.latest_checkpoint(run) == checkpoint
    model = result.model  # route and statistics did not train: they are the nearest task's
    assert torch.equal(model.routes[target].logits, model.routes[nearest].logits)
    for key, value in model.norm_stats[nearest].state_dict().items():
        assert torch.equal(model.norm_stats[target].state_dict()[key], value), key


def test_the_command_takes_init_from_nearest_and_says_what_it_chose(run, capsys):
    fast = ["--epochs", "1", "--train-limit", "320", "--test-limit", "64", "--no-progress"]
    args = ["transfer", str(run), "--task", "synth_shape-bg", "--init-from", "nearest"]
    assert main([*args, "--train", "head", *fast]) == 0
    assert (
        "init nearest: synth_color-bg (feature distance: synth_color-bg" in capsys.readouterr().out
    )


def test_a_uniform_route_start_has_equal_coefficients_and_the_source_statistics(run):
    result = transfer(
        run, "synth_shape", parts="head", init_from="synth_size", route_init="uniform",
        config=config(),
    )  # fmt: skip
    model = result.model
    coefficients = model.routes["synth_shape"].coefficients()
    assert coefficients.shape == (4, 3)
    assert torch.allclose(coefficients, torch.full((4, 3), 1 / 3), atol=1e-7, rtol=0)
    assert not torch.allclose(model.routes["synth_size"].coefficients(), coefficients)
    for key, value in model.norm_stats["synth_size"].state_dict().items():
        assert torch.equal(model.norm_stats["synth_shape"].state_dict()[key], value), key
    assert result.trained_parameters == sum(
        p.numel() for p in model.heads["synth_shape"].parameters()
    )


def test_an_anisotropic_route_starts_from_the_source_repeated(run):
    model = transfer(
        run, "synth_shape", parts="head", init_from="synth_size", route="anisotropic",
        config=config(),
    ).model  # fmt: skip
    logits, source = model.routes["synth_shape"].logits, model.routes["synth_size"].logits
    tensors = model.pool.num_tensors
    assert tensors > 1 and logits.shape == (4, 3, tensors)
    for g in range(tensors):
        assert torch.equal(logits[..., g], source)
    x = images(model, batch=4)
    with torch.no_grad():  # the same coefficients on every tensor: the source's function
        features = [model.forward_features(x, t) for t in ("synth_shape", "synth_size")]
    assert torch.allclose(*features, atol=1e-5)


def test_anisotropic_transfer_trains_its_route_and_leaves_every_other_task_bit_identical(run):
    before, _ = io.load_model(run)
    x = images(before, batch=6)
    with torch.no_grad():
        outputs = {t: before(x, t) for t in before.task_names}
    result = transfer(
        run, "synth_shape", parts="route,head", init_from="nearest", route="anisotropic",
        config=config(),
    )  # fmt: skip
    route = result.model.routes["synth_shape"]
    nearest = _results(run, "synth_shape")["nearest"]
    start = result.model.routes[nearest].logits.unsqueeze(-1).expand_as(route.logits)
    assert not torch.equal(route.logits, start)  # the route trained, per tensor
    head = result.model.heads["synth_shape"]
    trained = route.logits.numel() + sum(p.numel() for p in head.parameters())
    assert result.trained_parameters == trained
    after, _ = io.load_model(run)
    assert after.routes["synth_shape"].logits.shape == route.logits.shape  # saved and reloaded
    for key, value in before.state_dict().items():
        assert torch.equal(after.state_dict()[key], value), key
    with torch.no_grad():
        for task, output in outputs.items():
            assert torch.equal(after(x, task), output), task


def test_retraining_a_task_drops_the_templates_grown_for_it(pool, run, tmp_path):
    base = io.load_model(run)[0].pool.num_templates
    grown = transfer(run, "synth_shape", grow=1, config=config(epochs=2))
    assert [chunk.num_templates for chunk in grown.model.pool.chunks] == [base, 1]
    again = transfer(run, "synth_shape", overwrite=True, config=config())
    assert again.model.pool.num_templates == base  # the pool grew on every retry
    fresh = tmp_path / "fresh"
    shutil.copytree(pool, fresh)
    first = transfer(fresh, "synth_shape", config=config())
    assert again.accuracy == first.accuracy
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name

    # the curves show the retrained attempt only, though the first one ran twice as long
    def curves(run_dir):
        records = read_metrics(run_dir / "metrics.jsonl")
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in records]

    retried, phase = curves(run), "transfer-synth_shape"
    assert retried == curves(fresh)
    assert [r["epoch"] for r in retried if r["phase"] == phase and "accuracy" in r] == [1.0]
    # nothing was removed from the file: the replaced attempt's records are still there
    raw = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in raw if r.get("phase") == phase and "accuracy" in r]
    assert epochs == [1.0, 2.0, 1.0]


def test_a_task_the_pool_was_trained_with_is_never_replaced_by_transfer(run):
    before = {k: v.clone() for k, v in io.load_model(run)[0].state_dict().items()}
    (run / "results.json").unlink()  # the checkpoint's manifest says which phase trained it
    listing = sorted(p.relative_to(run) for p in run.rglob("*"))
    for overwrite in (False, True):
        with pytest.raises(
            RunDirError,
            match=r"'synth_size', one that `modnet train` trained its pool with: transfer never "
            r"replaces such a task .* saved under another name, or train a new run$",
        ):
            transfer(run, "synth_size", overwrite=overwrite, config=config())
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == listing
    after = io.load_model(run)[0].state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bad_route_options_are_refused_before_work_starts(run):
    with pytest.raises(ConfigError, match="unknown --route 'diagonal'.*anisotropic"):
        transfer(run, "synth_shape", route="diagonal", config=config())
    with pytest.raises(ConfigError, match="unknown --route-init 'random'.*uniform"):
        transfer(run, "synth_shape", route_init="random", config=config())
    with pytest.raises(
        ConfigError,
        match="'synth_cat' is not a task of the run: one of synth_color-bg, .* or nearest$",
    ):
        transfer(run, "synth_shape", init_from="synth_cat", config=config())
    # refused before the data is read: an unknown dataset would fail later
    with pytest.raises(ConfigError, match="'synth_cat' is not a task of the run"):
        transfer(run, "nosuchset", init_from="synth_cat", config=config())
    with pytest.raises(ConfigError, match="route_options: unknown route option 'tau'"):
        transfer(run, "nosuchset", route_options={"tau": 1}, config=config())
    # parts by the names --train takes, not the model's internal ones
    with pytest.raises(
        ConfigError,
        match=r"^unknown part 'rout' to train \(did you mean route\?\): choose from route, "
        r"head, norm, templates, trunk, stem, hypernet, all$",
    ):
        transfer(run, "synth_shape", parts="rout", config=config())
    assert parse_parts("ROUTE,Head") == {"routes", "heads"}
    with pytest.raises(ConfigError, match=r"new_templates: .* when --grow N \(grow=N\) adds"):
        transfer(run, "synth_shape", parts="route,new_templates", config=config())
    # ``all`` on a run without a hypernetwork: the refusal names what the run shares
    with pytest.raises(
        ConfigError, match=r"^--train all \(templates,trunk\) trains what every task"
    ):
        transfer(run, "synth_shape", parts="all", config=config())


def test_a_frozen_head_that_would_stay_random_is_named_in_a_warning(run):
    # synth_shape has 4 classes; synth_color-bg's head has 6: nothing to copy, head frozen
    with pytest.warns(UserWarning, match="--train norm,route leaves the head of 'synth_shape'"):
        transfer(
            run, "synth_shape", parts="route,norm", init_from="synth_color-bg", config=config()
        )
    with pytest.warns(UserWarning, match="^--train norm,route leaves the head"):  # --grow's
        transfer(run, "synth_shape", parts="route", grow=1, overwrite=True, config=config())
    # a source with the same classes lends its head: a frozen head is then no mistake
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*random and frozen")
        result = transfer(
            run, "synth_size-noise", parts="route", init_from="synth_size", config=config()
        )
    heads = result.model.heads
    assert torch.equal(heads["synth_size-noise"].weight, heads["synth_size"].weight)
