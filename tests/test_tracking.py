"""Run outputs: metrics.jsonl, TensorBoard event files, figures and the saved config."""

import json
import shutil
import sys

import pytest
import torch
import yaml
from conftest import tiny_conv
from PIL import Image

from modnet.cli import main
from modnet.errors import ConfigError
from modnet.train.tracking import MetricsLogger, make_logger

EVENT_ACCUMULATOR = "tensorboard.backend.event_processing.event_accumulator"
CONFIG = """\
tasks: [synth_color, synth_size]
model_kwargs: {depth: 3, width: 8, exp_ratio: 2.0, img_size: 16}
train_limit: 96
test_limit: 32
batch_size: 32
epochs: 2
log_every: 2
progress: false
"""


def scalars(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    (root / "run.yaml").write_text(CONFIG)
    argv = ["train", "--config", str(root / "run.yaml"), "--lr", "0.01", "--log", "tensorboard"]
    assert main([*argv, "--out", str(root / "run")]) == 0
    return root / "run"


def test_metrics_logger_appends_json_lines(tmp_path):
    logger = make_logger("jsonl", tmp_path / "run", "train")
    assert type(logger) is MetricsLogger
    logger.log(dict(phase="train", step=1, loss=0.5))
    logger.log(dict(phase="train", step=1, accuracy={"a": 1.0}))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        dict(phase="train", step=1, loss=0.5),
        dict(phase="train", step=1, accuracy={"a": 1.0}),
    ]


def test_unknown_or_missing_logger_is_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="unknown --log 'wandb': choose one of jsonl, tensorb"):
        make_logger("wandb", tmp_path, "train")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'pip install "modnet\[tensorboard\]"'):
        make_logger("tensorboard", tmp_path, "train")
    assert main(["train", "--log", "tensorboard", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()  # refused before any work


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_run_scalars_and_route_images(run_dir):
    event_accumulator = pytest.importorskip(EVENT_ACCUMULATOR)
    accumulator = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard" / "train"), size_guidance={"scalars": 0, "images": 0}
    )
    accumulator.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evaluations = [r for r in records if "accuracy" in r]
    assert len(steps) == 6 and len(evaluations) == 2  # 6 steps per epoch, a record every 2
    for key in ("loss", "lr", "samples_per_s"):
        logged = scalars(accumulator, key)
        assert [s for s, _ in logged] == [r["step"] for r in steps]
        assert [v for _, v in logged] == pytest.approx([r[key] for r in steps], rel=1e-6)
    for task in ("synth_color", "synth_size"):
        logged = scalars(accumulator, f"accuracy/{task}")
        assert [s for s, _ in logged] == [r["step"] for r in evaluations]
        assert [v for _, v in logged] == pytest.approx([r["accuracy"][task] for r in evaluations])
    images = accumulator.Images("routes")
    assert [image.step for image in images] == [r["step"] for r in evaluations]
    assert images[0].width > 200 and images[0].height > 100


@pytest.mark.slow
def test_train_writes_figures_and_plot_redraws_them(run_dir, tmp_path, capsys):
    for name in ("routes.png", "curves.png"):
        with Image.open(run_dir / name) as image:
            assert image.format == "PNG"
    capsys.readouterr()
    assert main(["plot", str(run_dir), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / n) for n in ("routes.png", "routes.txt", "curves.png")]
    assert (tmp_path / "routes.txt").read_text() == (run_dir / "routes.txt").read_text()
    assert main(["plot", str(run_dir), "--task", "synth_size", "--out", str(tmp_path / "one")]) == 0
    assert "synth_color" not in (tmp_path / "one" / "routes-synth_size.txt").read_text()
    # figures of some tasks never replace the run's figure of all of them
    assert main(["plot", str(run_dir), "--task", "synth_size"]) == 0
    assert "synth_color" in (run_dir / "routes.txt").read_text()
    assert (run_dir / "routes-synth_size.png").is_file()
    # a figure of some tasks in the run may be the user's: replaced only with --overwrite
    (run_dir / "routes-synth_color.txt").write_text("mine")
    for command in ("plot", "routes"):
        assert main([command, str(run_dir), "--task", "synth_color"]) == 2
        assert capsys.readouterr().err.endswith(
            f"{run_dir / 'routes-synth_color.txt'} already exists: choose another --out, or "
            "pass --overwrite to replace it\n"
        )
    assert (run_dir / "routes-synth_color.txt").read_text() == "mine"
    assert main(["routes", str(run_dir), "--task", "synth_color", "--overwrite"]) == 0
    assert "synth_color" in (run_dir / "routes-synth_color.txt").read_text()
    # nor a file the user has where --out points, unless --overwrite
    (tmp_path / "curves.png").write_bytes(b"mine")
    assert main(["plot", str(run_dir), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(
        f"{tmp_path / 'routes.png'}, routes.txt and curves.png already exist: choose another "
        "--out, or pass --overwrite to replace them\n"
    )
    assert (tmp_path / "curves.png").read_bytes() == b"mine"
    for out in (tmp_path / "curves.png", tmp_path / "figs" / "file.png"):  # a file, not a folder
        assert main(["routes", str(run_dir), "--out", str(out)]) == 2
        assert f"--out {out} is a file name: give the folder" in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()
    assert main(["plot", str(run_dir), "--out", str(tmp_path), "--overwrite"]) == 0
    assert (tmp_path / "curves.png").read_bytes() != b"mine"


@pytest.mark.slow
def test_a_run_trains_again_from_its_saved_config(run_dir, capsys):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["lr"] == 0.01 and saved["epochs"] == 2 and saved["log"] == "tensorboard"
    assert saved["model_kwargs"] == {"depth": 3, "width": 8, "exp_ratio": 2.0, "img_size": 16}
    again = run_dir.parent / "again"
    assert main(["train", "--config", str(run_dir / "config.yaml"), "--out", str(again)]) == 0
    assert yaml.safe_load((again / "config.yaml").read_text()) == saved
    first = json.loads((run_dir / "results.json").read_text())["train"]["accuracy"]
    second = json.loads((again / "results.json").read_text())["train"]["accuracy"]
    assert second == first
    losses = [
        [r.get("loss") for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
        for d in (run_dir, again)
    ]
    assert losses[0][: len(losses[1])] == losses[1]  # (a transfer may follow in run_dir)


@pytest.mark.slow
def test_a_transfer_saves_its_config_and_trains_again_from_it(run_dir, tmp_path):
    from modnet.cli import build_parser
    from modnet.commands import transfer

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)  # the trained pool, before any transfer
    fast = ["--epochs", "1", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32"]
    argv = ["transfer", str(run_dir), "--task", "synth_shape", "--train", "route,head", *fast]
    torch.manual_seed(0)  # transfer draws the new route from the global generator
    assert main([*argv, "--no-progress"]) == 0
    path = run_dir / "config-transfer-synth_shape.yaml"
    saved = yaml.safe_load(path.read_text())
    assert saved["task"] == "synth_shape" and saved["train"] == "route,head"
    assert saved["epochs"] == 1 and saved["train_limit"] == 64 and "model" not in saved
    again = build_parser().parse_args(["transfer", str(copy), "--config", str(path)])
    assert transfer.options(again) == saved
    torch.manual_seed(0)
    assert main(["transfer", str(copy), "--config", str(path)]) == 0
    assert yaml.safe_load((copy / path.name).read_text()) == saved
    first, second = (
        json.loads((d / "results.json").read_text())["transfer-synth_shape"]
        for d in (run_dir, copy)
    )
    assert second["accuracy"] == first["accuracy"]


def test_tensorboard_shows_only_the_last_attempt_of_a_retried_or_resumed_phase(tmp_path):
    event_accumulator = pytest.importorskip(EVENT_ACCUMULATOR)

    def attempt(first_step, steps, loss):
        logger = make_logger("tensorboard", tmp_path, "transfer-a", first_step)
        for step in steps:
            logger.log(dict(phase="transfer-a", step=step, loss=loss))
        logger.close()

    def logged():
        accumulator = event_accumulator.EventAccumulator(
            str(tmp_path / "tensorboard" / "transfer-a")
        )
        accumulator.Reload()
        return scalars(accumulator, "loss")

    attempt(0, [2, 4, 6, 8], 1.0)
    attempt(0, [2, 4], 0.5)  # transfer --overwrite: a fresh start with fewer steps
    assert logged() == [(2, 0.5), (4, 0.5)]
    attempt(0, [2, 4, 6], 0.25)  # killed after step 6 and its checkpoint at step 4 ...
    attempt(5, [6, 8], 0.125)  # ... resumed: the first step it logs is 5
    assert logged() == [(2, 0.25), (4, 0.25), (6, 0.125), (8, 0.125)]


def test_tensorboard_logger_writes_scalars_and_route_images_tensorboard_reads(tmp_path):
    event_accumulator = pytest.importorskip(EVENT_ACCUMULATOR)
    model = tiny_conv()
    model.add_task("a", 3)
    logger = make_logger("tensorboard", tmp_path, "transfer-a")
    logger.log(dict(phase="transfer-a", step=5, loss=0.75, lr=0.01, samples_per_s=123.0), model)
    logger.log(dict(phase="transfer-a", step=5, accuracy={"a": 0.5}), model)
    logger.close()
    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "transfer-a"))
    accumulator.Reload()
    assert scalars(accumulator, "loss") == [(5, 0.75)]
    assert scalars(accumulator, "samples_per_s") == [(5, 123.0)]
    assert scalars(accumulator, "accuracy/a") == [(5, 0.5)]
    assert scalars(accumulator, "lr")[0][1] == pytest.approx(0.01)
    (image,) = accumulator.Images("routes")
    assert image.step == 5 and image.width > 100
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # still written


def test_discarding_every_attempt_removes_the_phases_event_files_and_folder(tmp_path):
    from modnet.train.tracking import discard_events

    board = tmp_path / "tensorboard" / "adapt-x"
    board.mkdir(parents=True)
    files = [board / f"events.out.tfevents.{t}.host.1.0" for t in (100, 200)]
    for file in files:
        file.write_text("x")
    assert discard_events(tmp_path, "adapt-x", since=150) == [files[1]]
    assert discard_events(tmp_path, "adapt-x", since=None) == [files[0]]
    assert not board.exists()
    assert discard_events(tmp_path, "never-logged", since=None) == []
