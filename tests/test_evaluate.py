"""Inference in micro-batches: same logits and accuracy as one batch, chosen per family."""

from __future__ import annotations

import inspect
import json
import sys

import pytest
import torch

from modnet.data import load_task
from modnet.errors import ConfigError
from modnet.train import evaluate
from modnet.train.evaluate import (
    DEFAULT_MICRO_BATCH,
    MICRO_BATCH,
    default_micro_batch,
    input_format,
    predict,
)
from tests.conftest import images, tiny_conv, tiny_vit


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit], ids=["conv", "vit"])
@pytest.mark.parametrize("micro_batch", [1, 3, 64])
def test_predict_in_micro_batches_equals_one_forward(build, micro_batch):
    model = build(tasks={"a": 5}).eval()
    x = images(model, batch=10)
    with torch.no_grad():
        expected = model(x, task="a")
    out = predict(model, x, "a", micro_batch=micro_batch)
    assert out.shape == (10, 5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_predict_restores_the_training_mode_and_rejects_bad_sizes():
    model = tiny_conv(tasks={"a": 3}).train()
    predict(model, images(model), "a")
    assert model.training
    with pytest.raises(ValueError, match="micro_batch must be a positive integer, got 0"):
        predict(model, images(model), "a", micro_batch=0)


def test_default_micro_batch_is_the_familys():
    assert default_micro_batch(tiny_conv()) == MICRO_BATCH["conv"] == 16
    assert default_micro_batch(tiny_vit()) == MICRO_BATCH["vit"]
    assert default_micro_batch(torch.nn.Linear(2, 2)) == DEFAULT_MICRO_BATCH


def test_inputs_follow_the_layout_of_the_convolution_weights():
    model = tiny_conv(tasks={"a": 3})
    assert input_format(model) == torch.contiguous_format
    model._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    assert input_format(model) == torch.channels_last
    x = images(model, batch=6)
    with torch.no_grad():
        expected = model.eval()(x, task="a")
    torch.testing.assert_close(predict(model, x, "a", micro_batch=4), expected, atol=1e-5, rtol=0)


def test_evaluate_accuracy_does_not_depend_on_batch_or_micro_batch():
    model = tiny_conv(tasks={"synth_color": 6})
    data = {"synth_color": load_task("synth_color", img_size=8, train_limit=8, test_limit=50)}
    x = data["synth_color"].normalize(data["synth_color"].test_x)
    with torch.no_grad():  # a head centred on these images, so that predictions differ
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape))
        head = model.heads["synth_color"]
        head.bias.sub_(model.eval()(x, task="synth_color").mean(0))
        predicted = model(x, task="synth_color").argmax(-1)
    assert len(predicted.unique()) > 1  # a model that tells images apart
    reference = int((predicted == data["synth_color"].test_y).sum()) / 50
    for batch_size, micro_batch in ((256, 256), (256, None), (7, 3), (50, 1)):
        accuracy = evaluate(model, data, batch_size=batch_size, micro_batch=micro_batch)
        assert accuracy == {"synth_color": reference}


def test_modnet_eval_takes_a_micro_batch_and_gives_the_same_accuracy(tmp_path, capsys):
    from modnet import io
    from modnet.cli import main

    model = tiny_conv(tasks={"synth_color": 6, "synth_size": 3})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape))
    io.save_checkpoint(
        tmp_path,
        "m",
        model,
        task_info={name: {"dataset": name} for name in model.task_names},
    )
    results = []
    for extra in ([], ["--micro-batch", "3"], ["--micro-batch", "1000", "--batch-size", "7"]):
        assert main(["eval", str(tmp_path), "--json", "--test-limit", "40", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert set(results[0]) == {"synth_color", "synth_size"}
    assert results[0] == results[1] == results[2]
    # scoring shows a bar per task when asked (by default only on a terminal)
    assert capsys.readouterr().err == ""
    assert main(["eval", str(tmp_path), "--json", "--test-limit", "40", "--progress"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == results[0]
    assert "score synth_color" in captured.err and "score synth_size" in captured.err
    assert "0/40 [" in captured.err  # counted in images of the task's test split


def test_the_trainers_evaluation_uses_the_configured_micro_batch(tmp_path, monkeypatch):
    """TrainConfig.eval_micro_batch reaches every forward pass of the trainer's evaluation."""
    from modnet.train import TrainConfig, train

    evaluation = sys.modules["modnet.train.evaluate"]  # the module, not the function it exports

    seen = []
    original = evaluation.predict

    def spy(*args, **kwargs):
        bound = inspect.signature(original).bind(*args, **kwargs)
        seen.append(bound.arguments.get("micro_batch"))
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "predict", spy)
    config = TrainConfig(
        model_kwargs=dict(width=8, exp_ratio=2.0, img_size=8, num_templates=2, depth=2),
        tasks=["synth_color"],
        train_limit=32,
        test_limit=16,
        epochs=1,
        batch_size=16,
        eval_micro_batch=3,
        progress=False,
    )
    train(config, tmp_path / "run")
    assert seen and set(seen) == {3}
    # 0: one pass per evaluation batch, as `modnet eval --micro-batch 0`
    seen.clear()
    config.eval_micro_batch, config.eval_batch_size = 0, 8
    train(config, tmp_path / "whole")
    assert seen and set(seen) == {8}


class Untouchable(dict):
    """Task data that must not be read: the check comes before any work."""

    def items(self):
        raise AssertionError("the data was read before the precision was checked")


@pytest.mark.parametrize("precision", ["fp16", "auto", "BF16"])
def test_an_unknown_precision_is_refused_before_any_work(precision):
    model = tiny_conv(tasks={"a": 3})
    message = f"unknown precision {precision!r}: choose one of fp32, bf16"
    with pytest.raises(ConfigError) as error:
        evaluate(model, Untouchable(a=None), precision=precision)
    assert str(error.value) == message
    with pytest.raises(ConfigError) as error:
        predict(model, images(model), "a", precision=precision)
    assert str(error.value) == message
    for accepted in ("fp32", "bf16"):  # the two it takes still run
        assert predict(model, images(model), "a", precision=accepted).shape == (4, 3)


def test_modnet_eval_reads_data_from_the_data_root_the_run_recorded(tmp_path, monkeypatch, capsys):
    import numpy as np

    from modnet import io
    from modnet.cli import main

    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    np.savez(data / "digits.npz", train_x=x, train_y=y, test_x=x, test_y=y)
    run = tmp_path / "run"
    model = tiny_conv(tasks={"digits": 3})
    info = {"digits": {"dataset": "npz:digits.npz", "phase": "train"}}  # relative to the root
    io.save_checkpoint(run, "train-final", model, task_info=info)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MODNET_DATA_ROOT", raising=False)
    assert main(["eval", str(run), "--json"]) == 2  # no root known: the data is not found
    assert "digits.npz" in capsys.readouterr().err
    (run / "config.yaml").write_text(f"data_root: {data}\n")  # as `modnet train` saves it
    assert main(["eval", str(run), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--json", "--data-root", str(data)]) == 0
    assert json.loads(capsys.readouterr().out) == scored
    # --data-root, then $MODNET_DATA_ROOT, come before the recorded root
    assert main(["eval", str(run), "--json", "--data-root", str(elsewhere)]) == 2
    monkeypatch.setenv("MODNET_DATA_ROOT", str(elsewhere))
    assert main(["eval", str(run), "--json"]) == 2
    assert "digits.npz" in capsys.readouterr().err
