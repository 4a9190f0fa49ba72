"""Training, transfer and growth on the synthetic suite, with tiny models."""

import json

import pytest
import torch

from modnet import io
from modnet.data import DataError
from modnet.errors import ConfigError
from modnet.train import RunDirError, TrainConfig, train, transfer
from tests.conftest import images, tiny_train_config

TINY = dict(depth=4, width=12, exp_ratio=2.0, img_size=16, num_templates=3)


def tiny_config(**overrides) -> TrainConfig:
    values = dict(tasks=["synth_color", "synth_size"], train_limit=480, test_limit=120, epochs=3)
    return tiny_train_config(TINY, **{**values, **overrides})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "multi"
    result = train(tiny_config(), run_dir)
    return result, run_dir


@pytest.mark.slow
def test_multi_task_training_lowers_the_loss_and_beats_chance(trained_run):
    result, run_dir = trained_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert result.accuracy["synth_color"] > 1 / 6 + 0.3
    assert result.accuracy["synth_size"] > 1 / 3 + 0.2
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["accuracy"] == result.accuracy
    for name in ("routes.png", "routes.txt", "LATEST"):
        assert (run_dir / name).is_file()


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten_by_accident(trained_run):
    _, run_dir = trained_run
    with pytest.raises(RunDirError, match="already holds a finished run.*--overwrite"):
        train(tiny_config(), run_dir)


def _old_tasks_snapshot(run_dir):
    model, _ = io.load_model(run_dir)
    x = images(model, batch=6)
    with torch.no_grad():
        outputs = {t: model(x, t) for t in model.task_names}
    return model, x, outputs


@pytest.mark.parametrize("grow", [0, 2])
@pytest.mark.slow
def test_transfer_trains_only_the_new_route_head_and_stats(trained_run, tmp_path, grow):
    _, source = trained_run
    run_dir = tmp_path / "run"
    io.save_checkpoint(run_dir, "train-copy", io.load_model(source)[0])
    before, x, outputs = _old_tasks_snapshot(run_dir)
    config = tiny_config(epochs=2, lr=1e-2)
    result = transfer(run_dir, "synth_shape", parts="route,head", grow=grow, config=config)
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("routes.synth_shape.", "heads.synth_shape."))
    }
    if grow:
        expected |= {n for n, _ in model.named_parameters() if n.startswith("pool.chunks.1.")}
    assert trainable == expected
    after, _ = io.load_model(run_dir)
    for key, value in before.state_dict().items():  # every old tensor bit-identical
        assert torch.equal(after.state_dict()[key], value), key
    with torch.no_grad():
        for task, output in outputs.items():
            assert torch.equal(after(x, task), output), task
    assert after.pool.num_templates == 3 + grow
    assert result.trained_parameters == sum(
        p.numel() for n, p in model.named_parameters() if n in expected
    )
    assert result.accuracy["synth_shape"] > 0.0
    stats = after.norm_stats["synth_shape"].state_dict()
    assert not torch.equal(
        stats["trunk__stem__1__running_var"], torch.ones_like(stats["trunk__stem__1__running_var"])
    )


@pytest.mark.slow
def test_transfer_refuses_an_existing_task_and_a_missing_run(trained_run, tmp_path):
    _, run_dir = trained_run
    with pytest.raises(RunDirError, match="already has a task 'synth_color', one that `modnet"):
        transfer(run_dir, "synth_color", config=tiny_config())
    with pytest.raises(RunDirError, match="holds no trained run"):
        transfer(tmp_path / "nothing", "synth_color", config=tiny_config())


def test_bad_data_fails_before_anything_is_written(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nosuchset'"):
        train(tiny_config(tasks=["nosuchset"]), tmp_path / "run")
    with pytest.raises(DataError, match="--data-root"):
        train(tiny_config(tasks=["mnist"], data_root=str(tmp_path / "empty")), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_alternating_batches_train_as_well(tmp_path):
    result = train(tiny_config(mixing="alternate", epochs=2), tmp_path / "alt")
    assert result.accuracy["synth_color"] > 1 / 6 + 0.2


@pytest.mark.slow
def test_route_only_transfer_reuses_the_source_head_and_moves_only_the_route(trained_run, tmp_path):
    _, source = trained_run
    run_dir = tmp_path / "run"
    io.save_checkpoint(run_dir, "train-copy", io.load_model(source)[0])
    config = tiny_config(epochs=1)
    result = transfer(
        run_dir, "synth_color-bg", parts="route", config=config, init_from="synth_color"
    )
    model = result.model
    head, source_head = model.heads["synth_color-bg"], model.heads["synth_color"]
    assert torch.equal(head.weight, source_head.weight)
    assert result.trained_parameters == model.routes["synth_color-bg"].logits.numel()
    assert not torch.equal(
        model.routes["synth_color-bg"].logits, model.routes["synth_color"].logits
    )
    stats, source_stats = model.norm_stats["synth_color-bg"], model.norm_stats["synth_color"]
    for key, value in source_stats.state_dict().items():  # statistics frozen at the source's
        assert torch.equal(stats.state_dict()[key], value), key


def test_a_transfer_depends_on_its_seed_alone(trained_run, tmp_path):
    """Two transfers with the same --seed start the new task from the same head and route."""
    import shutil

    _, run_dir = trained_run
    results = []
    for copy in ("a", "b"):
        torch.manual_seed(1000 + len(copy) * ord(copy))  # whatever the caller's RNG holds
        target = tmp_path / copy
        shutil.copytree(run_dir, target)
        config = tiny_config(epochs=1, train_limit=64, test_limit=32)
        results.append(transfer(target, "synth_shape", config=config).model)
    first, second = (m.state_dict() for m in results)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_scoring_the_test_splits_only_at_the_end_trains_the_same_model(trained_run, tmp_path):
    result, run_dir = trained_run
    less = train(tiny_config(eval_every=0), tmp_path / "less")
    assert less.accuracy == result.accuracy
    expected = result.model.state_dict()
    for name, value in less.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for run, scored in ((tmp_path / "less", [3.0]), (run_dir, [1.0, 2.0, 3.0])):
        records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
        assert [r["epoch"] for r in records if "accuracy" in r] == scored


@pytest.mark.parametrize("every, epochs", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5])])
def test_eval_every_scores_every_n_epochs_and_after_the_last_step(every, epochs):
    from types import SimpleNamespace

    from modnet.train.loop import Trainer

    trainer = SimpleNamespace(
        schedule=SimpleNamespace(steps_per_epoch=4),
        total_steps=18,  # the last epoch is short
        config=tiny_config(eval_every=every),
    )
    scored = [s for s in range(1, 19) if Trainer._evaluates_at(trainer, s)]
    assert scored == [min(4 * e, 18) for e in epochs]


def test_eval_every_is_checked_before_any_work():
    with pytest.raises(ConfigError, match="^--eval-every must be at least 0, got -1$"):
        tiny_config(eval_every=-1)


def test_an_interrupted_run_ends_its_progress_bar_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-run: the bar is closed, so the CLI's one-line message starts a line."""
    from modnet.train.loop import Trainer

    steps = Trainer._train_step

    def step(self, index: int):
        if index == 2:
            raise KeyboardInterrupt
        return steps(self, index)

    monkeypatch.setattr(Trainer, "_train_step", step)
    capsys.readouterr()
    try:
        train(tiny_config(progress=True, train_limit=96, test_limit=32), tmp_path / "run")
    except KeyboardInterrupt:  # read while its frames live, as the CLI prints its line
        err = capsys.readouterr().err
    else:
        pytest.fail("training swallowed the interrupt")
    assert "2/" in err and err.endswith("\n"), repr(err[-80:])
