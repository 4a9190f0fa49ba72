"""Unsupervised adaptation on the synthetic suite: gains, what may change, every objective, errors.

Sources ``synth_size`` and ``synth_size-bg`` train one tiny pool; the target
``synth_size-color`` (a colour cast) is adapted without its labels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from modnet import io
from modnet.adapt import AdaptationError, adapt, add_target_task
from modnet.cli import main
from modnet.data import DataError
from modnet.train import RunDirError, TrainConfig, train, transfer
from tests.conftest import tiny_train_config

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)

SOURCES = ["synth_size", "synth_size-bg"]
TARGET = "synth_size-color"
MODEL = dict(depth=6, width=16, exp_ratio=2.0, img_size=16, num_templates=4)
# Route-only moment matching beats the source-only start (the sources' average) by
# 0.15-0.21 for seeds 0-2 (and the best single source by -0.03 to +0.05).
MARGIN = 0.05


def config(**overrides) -> TrainConfig:
    values = dict(train_limit=600, test_limit=300, epochs=6)
    return tiny_train_config(MODEL, **{**values, **overrides})


@pytest.fixture(scope="module")
def sources_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("adapt") / "sources"
    train(config(tasks=SOURCES, epochs=5), run_dir)
    return run_dir


@pytest.fixture
def run(sources_run, tmp_path):
    """A fresh copy of the trained sources for each test."""
    copy = tmp_path / "run"
    shutil.copytree(sources_run, copy)
    return copy


def _initial_state(run_dir):
    """Every tensor as adaptation starts: the sources and the target initialised from them."""
    model, _ = io.load_model(run_dir)
    add_target_task(model, TARGET, 3, SOURCES)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(before, after) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(after[k], v)}


@pytest.fixture(scope="module")
def route_only(sources_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("route_only") / "run"
    shutil.copytree(sources_run, run_dir)
    before = _initial_state(run_dir)
    result = adapt(run_dir, TARGET, SOURCES, objective="moments", config=config())
    return run_dir, before, result


def test_route_only_adaptation_beats_source_only_by_a_margin(route_only):
    run_dir, _, result = route_only
    assert result.parts == ["routes"]
    assert result.accuracy > result.start_accuracy + MARGIN
    assert result.trained_parameters == 6 * 4  # one logit per (layer, template)
    results = json.loads((run_dir / "results.json").read_text())[f"adapt-{TARGET}"]
    assert results["adapted_accuracy"] == result.accuracy
    assert results["source_only"] == result.source_only
    assert set(results["route_relation"]["to"]) == {*SOURCES, "average", "start"}
    assert (run_dir / f"adapt-{TARGET}-routes.png").is_file()


def test_route_only_changes_the_target_route_and_nothing_else(route_only):
    run_dir, before, result = route_only
    after = io.load_model(run_dir)[0].state_dict()
    assert set(after) == set(before)
    assert _changed(before, after) == {f"routes.{TARGET}.logits"}  # the rest: bit-identical
    mean = "layers__bn1__running_mean"  # the target starts from the sources' mixture
    mixed = (
        before[f"norm_stats.{SOURCES[0]}.{mean}"] + before[f"norm_stats.{SOURCES[1]}.{mean}"]
    ) / 2
    assert torch.allclose(after[f"norm_stats.{TARGET}.{mean}"], mixed)
    for source in SOURCES:
        assert result.source_accuracy[source] == pytest.approx(
            json.loads((run_dir / "results.json").read_text())["train"]["accuracy"][source]
        )


@pytest.mark.parametrize(
    "objective, parts, allowed",
    [
        ("entropy", "route", ("routes.T.",)),
        ("adversarial", "route", ("routes.T.",)),
        ("norm_stats", "route", ("norm_stats.T.",)),
        ("moments", "route,norm", ("routes.T.", "norm_stats.T.")),
        ("moments", "route,stem", ("routes.T.", "trunk.stem.0.", "trunk.stem.1.")),
    ],
)
def test_each_objective_lowers_its_loss_and_changes_only_what_is_allowed(
    run, objective, parts, allowed
):
    before = _initial_state(run)
    result = adapt(
        run,
        TARGET,
        SOURCES,
        objective=objective,
        parts=parts,
        config=config(epochs=2),
        update_shared="stem" in parts,
    )
    trace = result.loss_trace
    quarter = max(1, len(trace) // 4)
    assert np.mean(trace[-quarter:]) < np.mean(trace[:quarter])
    after = io.load_model(run)[0].state_dict()
    prefixes = tuple(p.replace(".T.", f".{TARGET}.") for p in allowed)
    changed = _changed(before, after)
    assert set(after) == set(before)
    assert changed and all(k.startswith(prefixes) for k in changed), changed
    if "stem" in parts:  # shared: the sources' supervised loss kept them working
        assert any(k.startswith("trunk.stem") for k in changed)
        assert min(result.source_accuracy.values()) > 0.45


def test_the_adapted_target_works_with_eval_routes_and_export(route_only, tmp_path, capsys):
    run_dir, _, result = route_only
    assert main(["eval", str(run_dir), "--task", TARGET, "--json", "--test-limit", "300"]) == 0
    assert json.loads(capsys.readouterr().out)[TARGET] == pytest.approx(result.accuracy)
    assert main(["routes", str(run_dir), "--task", TARGET, "--out", str(tmp_path)]) == 0
    assert (tmp_path / f"routes-{TARGET}.png").is_file()
    out = tmp_path / "target.pt2"
    assert main(["export", str(run_dir), "--task", TARGET, "--out", str(out)]) == 0
    assert out.is_file()


def test_what_a_run_records_about_each_task_survives_later_phases(route_only, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(route_only[0], run_dir)
    before = io.load_model(run_dir)[1]["tasks"]
    assert (
        before[TARGET]["adapted_from"] == SOURCES and before[TARGET]["phase"] == f"adapt-{TARGET}"
    )
    assert {before[s]["phase"] for s in SOURCES} == {"train"}
    transfer(run_dir, "synth_shape", config=config(epochs=1, train_limit=64, test_limit=32))
    after = io.load_model(run_dir)[1]["tasks"]
    structure = {"num_classes", "route", "file"}
    for name, entry in before.items():  # the adapted target is still known as adapted
        assert after[name] == entry, name
        assert set(entry) - structure >= {"dataset", "transform", "phase"}
    assert after["synth_shape"]["phase"] == "transfer-synth_shape"
    # an adapted task is adapted again, not replaced by a labelled transfer
    with pytest.raises(RunDirError, match=f"'{TARGET}', one that `modnet adapt` adapted without"):
        transfer(run_dir, TARGET, overwrite=True, config=config())
    assert io.load_model(run_dir)[1]["tasks"] == after


def test_the_adapt_command_prints_source_only_and_adapted_side_by_side(run, capsys):
    args = ["adapt", str(run), "--target", TARGET]  # sources: every task with its classes
    fast = ["--objective", "entropy", "--epochs", "1", "--train-limit", "300", "--no-progress"]
    fast += ["--init", "nearest"]
    assert main([*args, *fast, "--test-limit", "100", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    # the saved options name the sources used, which a run grown since would not repeat
    saved = yaml.safe_load((run / f"config-adapt-{TARGET}.yaml").read_text())
    assert saved["sources"] == ",".join(SOURCES)
    for line in (f"source-only {SOURCES[0]}", f"source-only {SOURCES[1]}", "adapted"):
        assert line in out
    assert "trained parameters: 24" in out
    assert "start (init nearest: synth_size" in out and "feature distance" in out
    assert main([*args, *fast]) == 2  # the task exists now
    assert "already has a task" in capsys.readouterr().err


def test_bad_input_gives_clear_errors(run, tmp_path):
    fast = config(epochs=1, train_limit=64, test_limit=32)
    with pytest.raises(AdaptationError, match="target 'synth_size' is also a source"):
        adapt(run, "synth_size", SOURCES, config=fast)
    with pytest.raises(AdaptationError, match="'synth_size-bg' is a task the run learned with"):
        adapt(run, "synth_size-bg", ["synth_size"], config=fast)
    with pytest.raises(AdaptationError, match="unknown init 'best'.*'nearest'"):
        adapt(run, TARGET, SOURCES, init="best", config=fast)
    with pytest.raises(AdaptationError, match="unknown adaptation objective 'mmd'.*moments"):
        adapt(run, TARGET, SOURCES, objective="mmd", config=fast)
    empty = tmp_path / "empty.npz"
    nothing = np.zeros((0, 16, 16, 3), np.uint8)
    np.savez(empty, train_x=nothing, train_y=np.zeros(0, np.int64),
             test_x=np.zeros((4, 16, 16, 3), np.uint8), test_y=np.arange(4))  # fmt: skip
    with pytest.raises(DataError, match="cannot load the target domain.*training images.*empty"):
        adapt(run, f"npz:{empty}", SOURCES, config=fast)
    with pytest.raises(AdaptationError, match="unknown source task.*synth_color"):
        adapt(run, TARGET, ["synth_color"], config=fast)
    # named sources are refused before any data is read (an unknown dataset fails later)
    with pytest.raises(AdaptationError, match="unknown source task.*synth_color"):
        adapt(run, "nosuchset", ["synth_color"], config=fast)
    with pytest.raises(AdaptationError, match="a source is listed twice"):
        adapt(run, "nosuchset", [SOURCES[0], SOURCES[0]], config=fast)
    with pytest.raises(AdaptationError, match="norm alone trains no parameter"):
        adapt(run, TARGET, SOURCES, parts="norm", config=fast)
    with pytest.raises(RunDirError, match="holds no trained run"):
        adapt(tmp_path / "nothing", TARGET, SOURCES, config=fast)


def test_adaptation_runs_through_the_compiled_model(run, monkeypatch):
    """With compile=True the adaptation's forward passes are compiled graphs, not eager calls.

    The graphs are captured by dynamo and differentiated by AOTAutograd as with the
    default backend; ``aot_eager`` runs them without Inductor's C++ build (a minute
    and more on a cold cache). tests/test_compile.py checks Inductor's numerics.
    """
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    # whole batches only, and a small test split: every compiled graph sees one shape
    cfg = config(compile=True, epochs=1, train_limit=128, test_limit=64)
    result = adapt(run, TARGET, SOURCES, objective="moments", config=cfg)
    assert counters["stats"]["unique_graphs"] >= 1
    # the compiled graphs compute what eager mode does: the same losses, route and score
    eager_cfg = dataclasses.replace(cfg, compile=False)
    eager = adapt(run, TARGET, SOURCES, objective="moments", config=eager_cfg, overwrite=True)
    assert result.loss_trace == pytest.approx(eager.loss_trace, rel=1e-5)
    got, want = (r.model.routes[TARGET].plan(None).coefficients for r in (result, eager))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert result.accuracy == eager.accuracy


def test_the_accuracy_curve_ends_at_the_reported_accuracy(run):
    # 192 target images in batches of 32: 6 steps, a point every 2 (and before the first).
    cfg = config(epochs=1, train_limit=192, batch_size=32)
    result = adapt(run, TARGET, SOURCES, objective="pseudo_label", config=cfg, curve_every=2,
                   curve_sample=1000)  # fmt: skip
    assert [p["step"] for p in result.curve] == [0, 2, 4, 6]
    assert result.curve[0]["accuracy"] == result.start_accuracy
    assert result.curve[-1]["accuracy"] == result.accuracy
    results = json.loads((run / "results.json").read_text())[f"adapt-{TARGET}"]
    assert results["curve"] == result.curve


def test_the_adapt_command_trains_an_anisotropic_route_with_sliced_wasserstein(run):
    args = ["adapt", str(run), "--target", TARGET, "--sources", ",".join(SOURCES)]
    args += ["--objective", "sliced_wasserstein", "--objective-arg", "projections=32"]
    args += ["--anisotropic", "--epochs", "1", "--train-limit", "200", "--no-progress"]
    assert main(args) == 0
    model, _ = io.load_model(run)
    tensors = model.pool.num_tensors
    assert model.routes[TARGET].logits.shape == (6, 4, tensors)
    results = json.loads((run / "results.json").read_text())[f"adapt-{TARGET}"]
    assert results["anisotropic"] is True
    assert results["trained_parameters"] == 6 * 4 * tensors
    assert results["first_loss"] > 0


def test_adapt_starts_from_the_average_of_an_anisotropic_and_an_isotropic_source(run, capsys):
    from modnet.plot import route_matrix

    fast = ["--train-limit", "64", "--test-limit", "32", "--epochs", "1", "--no-progress"]
    assert main(["adapt", str(run), "--target", "synth_size", *fast]) == 2
    err = capsys.readouterr().err
    assert "'synth_size' is a task the run learned with labels" in err
    assert "no task of the run" not in err
    args = ["adapt", str(run), "--target", "synth_size-color", "--anisotropic"]
    assert main([*args, "--train", "route,norm", *fast]) == 0
    model, _ = io.load_model(run)
    tensors = model.pool.num_tensors
    iso = [route_matrix(model, s) for s in SOURCES]
    aniso = model.routes["synth_size-color"].coefficients().detach()
    assert iso[0].shape == (6, 4) and aniso.shape == (6, 4, tensors)
    # norm_stats trains no route: the targets keep the routes they start with
    keep = ["--objective", "norm_stats", *fast]
    assert main(["adapt", str(run), "--target", "synth_size-noise", *keep]) == 0
    sources = ["--sources", "synth_size,synth_size-color", "--anisotropic"]
    assert main(["adapt", str(run), "--target", "synth_size-bg-noise", *sources, *keep]) == 0
    model, manifest = io.load_model(run)
    assert manifest["tasks"]["synth_size-noise"]["adapted_from"] == [*SOURCES, "synth_size-color"]
    route = model.routes["synth_size-noise"].coefficients().detach()
    assert route.shape == (6, 4)
    torch.testing.assert_close(route, (iso[0] + iso[1] + aniso.mean(-1)) / 3)
    route = model.routes["synth_size-bg-noise"].coefficients().detach()
    assert route.shape == (6, 4, tensors)
    torch.testing.assert_close(route, (iso[0].unsqueeze(-1) + aniso) / 2)
