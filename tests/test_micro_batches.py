"""Micro-batches: gradients accumulate to the whole batch's; statistics move by their mean."""

import copy

import pytest
import torch
from conftest import tiny_conv, tiny_vit

from modnet.data import load_task
from modnet.train import TrainConfig, Trainer
from modnet.train.distributed import DistContext

TASKS = ("synth_color", "synth_size")


def trainer(make, tmp_path, micro: int, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = make()
    size = model.pretrained_cfg["input_size"][1]
    data = {t: load_task(t, img_size=size, train_limit=24, test_limit=8) for t in TASKS}
    for task in data.values():
        model.add_task(task.name, task.num_classes)
    model.set_trainable(list(data), "all")
    values = dict(batch_size=8, epochs=1, micro_batch_size=micro, progress=False, log_every=100)
    config = TrainConfig(**{**values, **overrides})
    return Trainer(model, data, config, tmp_path / f"m{micro}", "train", DistContext(), {})


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch(tmp_path):
    # SGD: AdamW would scale rounding noise in gradients that are exactly 0 (key biases)
    whole = trainer(tiny_vit, tmp_path, 0, optimizer="sgd", lr=0.05, route_lr=0.2)
    split = trainer(tiny_vit, tmp_path, 3, optimizer="sgd", lr=0.05, route_lr=0.2)
    assert (whole.micro_batches, split.micro_batches) == (1, 3)
    for step in range(6):
        whole_loss, whole_samples = whole._train_step(step)
        split_loss, split_samples = split._train_step(step)
        assert whole_samples == split_samples == 8
        assert split_loss == pytest.approx(whole_loss, abs=1e-5)
    for (key, a), b in zip(
        whole.model.state_dict().items(), split.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), key


def test_running_statistics_move_by_the_mean_of_the_micro_batches(tmp_path):
    run = trainer(tiny_conv, tmp_path, 4)
    start = copy.deepcopy(run.model)
    shares = [run.batch(0, micro) for micro in range(run.micro_batches)]
    run._train_step(0)
    expected = []
    for x, _, ids in shares:  # each micro-batch from the step's starting statistics
        model = copy.deepcopy(start).train()
        model(x, task=ids)
        expected.append(model.state_dict())
    for key, value in run.model.state_dict().items():
        if key.startswith("norm_stats.") and value.is_floating_point():
            mean = torch.stack([e[key] for e in expected]).mean(0)
            assert torch.allclose(value, mean, rtol=0, atol=1e-6), key
            assert not torch.equal(value, start.state_dict()[key]), key
        elif key.startswith("norm_stats."):  # a counter: every micro-batch with the task
            seen = sum(e[key] - start.state_dict()[key] for e in expected)
            assert torch.equal(value - start.state_dict()[key], seen) and seen.min() > 0, key


def test_micro_batch_size_is_checked():
    with pytest.raises(ValueError, match="micro-batch-size must be at least 0"):
        TrainConfig(micro_batch_size=-1)
    assert TrainConfig(micro_batch_size=None).micro_batch_size == 0


def test_the_command_line_sets_the_micro_batch_size():
    import argparse

    from modnet.commands._options import add_training_options, config_from_args

    parser = argparse.ArgumentParser()
    add_training_options(parser)
    assert config_from_args(parser.parse_args([])).micro_batch_size == 0
    args = parser.parse_args(["--batch-size", "64", "--micro-batch-size", "16"])
    assert config_from_args(args).micro_batch_size == 16


def test_a_trainer_refuses_a_folder_modnet_did_not_write_before_writing_to_it(tmp_path):
    from modnet.errors import RunDirError

    folder = tmp_path / "m4"
    folder.mkdir()
    (folder / "LATEST").write_text("v2.1")
    (folder / "metrics.jsonl").write_text("my log\n")
    with pytest.raises(RunDirError, match="is not a modnet run directory"):
        trainer(tiny_conv, tmp_path, 4)
    assert (folder / "metrics.jsonl").read_text() == "my log\n"  # once appended to
    assert sorted(p.name for p in folder.iterdir()) == ["LATEST", "metrics.jsonl"]
