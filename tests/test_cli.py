"""The modnet command end to end on the synthetic suite, with a tiny model."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from modnet import io
from modnet.cli import main

TINY = [
    "--model-arg",
    "depth=3",
    "--model-arg",
    "width=8",
    "--model-arg",
    "exp_ratio=2.0",
    "--model-arg",
    "img_size=16",
]
FAST = [
    "--train-limit",
    "160",
    "--test-limit",
    "40",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert (
        main(["train", "--tasks", "synth_color,synth_size", *TINY, *FAST, "--out", str(out)]) == 0
    )
    return out


def test_train_prints_the_accuracy_table(run_dir, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["train"]["accuracy"]) == {"synth_color", "synth_size"}


def test_transfer_eval_routes_and_export(run_dir, capsys):
    assert main(["transfer", str(run_dir), "--task", "synth_shape", "--grow", "1", *FAST]) == 0
    capsys.readouterr()
    # the run's own route figure and table now show the new task, with its template
    assert "task synth_shape" in (run_dir / "routes.txt").read_text()
    assert "T4" in (run_dir / "routes.txt").read_text()
    # --download, which the missing-data message suggests, is an option of eval too
    assert main(["eval", str(run_dir), "--json", "--test-limit", "40", "--download"]) == 0
    out, err = capsys.readouterr()
    accuracy = json.loads(out)
    assert err == ""
    # the whole test split is not what the run scored: said, with how to repeat the run's
    assert main(["eval", str(run_dir), "--task", "synth_color"]) == 0
    note = (
        "modnet: scoring the whole test splits; the run scored synth_color on a subset of at "
        "most 40 test images each (its --test-limit), so these figures differ from its "
        "results.json; --test-limit 40 scores that subset\n"
    )
    assert capsys.readouterr().err == note
    checkpoint = io.latest_checkpoint(run_dir)  # a checkpoint of the run: the same note
    assert main(["eval", str(checkpoint), "--task", "synth_color"]) == 0
    assert capsys.readouterr().err == note
    # a --test-limit other than the run's is said too, for limited and whole splits alike
    assert main(["eval", str(run_dir), "--task", "synth_color", "--test-limit", "20"]) == 0
    assert capsys.readouterr().err == note.replace(
        "the whole test splits", "at most 20 test images"
    )
    # a test split no larger than both limits scores the same: nothing to say
    from modnet.commands.eval import _note_recorded_limit

    manifest = io.load_model(run_dir)[1]
    _note_recorded_limit(str(run_dir), manifest, {"synth_color": 40}, None)
    _note_recorded_limit(str(run_dir), manifest, {"synth_color": 35}, 50)
    assert capsys.readouterr().err == ""
    _note_recorded_limit(str(run_dir), manifest, {"synth_color": 41}, None)
    assert "the run scored synth_color on a subset of at most 40" in capsys.readouterr().err
    # the limit is the one each task's data record holds: an unreadable or missing
    # options file (the Python API writes none) changes nothing
    both = note.replace("synth_color on", "synth_shape, synth_color on")
    saved = run_dir / "config-transfer-synth_shape.yaml"
    text = saved.read_text()
    for damage in (lambda: saved.write_bytes(b"\xff\xfe\x00 not text"), saved.unlink):
        damage()
        assert main(["eval", str(run_dir), "--task", "synth_shape", "--task", "synth_color"]) == 0
        assert capsys.readouterr().err == both
    # a record without the limit (older runs) falls back on the options file
    older = copy.deepcopy(manifest)
    del older["tasks"]["synth_shape"]["transform"]["subset"]["test_limit"]
    saved.write_text(text.replace("test_limit: 40", "test_limit: null"))
    _note_recorded_limit(str(run_dir), older, {"synth_shape": 100}, None)
    assert capsys.readouterr().err == ""
    _note_recorded_limit(str(run_dir), older, {"synth_shape": 100}, 20)
    assert capsys.readouterr().err == (
        "modnet: scoring at most 20 test images per task; the run scored synth_shape on the "
        "whole test split, so these figures differ from its results.json; leave out "
        "--test-limit to score what it scored\n"
    )
    saved.unlink()  # neither says: only the note is lost
    _note_recorded_limit(str(run_dir), older, {"synth_shape": 100}, 20)
    assert capsys.readouterr().err == ""
    saved.write_text(text)
    assert set(accuracy) == {"synth_color", "synth_size", "synth_shape"}
    results = json.loads((run_dir / "results.json").read_text())
    assert accuracy["synth_shape"] == pytest.approx(
        results["transfer-synth_shape"]["accuracy"]["synth_shape"]
    )
    assert main(["routes", str(run_dir), "--out", str(run_dir / "fig")]) == 0
    table = capsys.readouterr().out
    assert "task synth_shape" in table and "T4" in table  # the grown template is a column
    assert (run_dir / "fig" / "routes.png").stat().st_size > 500
    out = run_dir.parent / "color.pt2"  # outside the run: not among its own files
    assert main(["export", str(run_dir), "--task", "synth_color", "--out", str(out)]) == 0
    program = torch.export.load(str(out)).module()
    model, _ = io.load_model(run_dir, tasks=["synth_color"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-6)


def test_output_to_a_reader_that_left_ends_quietly(run_dir, capsys, monkeypatch):
    # ``modnet routes RUN | head -1``: the reader closed the pipe before modnet wrote
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = open(write_end, "w")  # noqa: SIM115 - stands in for stdout
    monkeypatch.setattr(sys, "stdout", closed)
    assert main(["routes", str(run_dir), "--out", str(run_dir / "p")]) == 1
    assert capsys.readouterr().err == ""
    closed.write("x" * 100_000)  # what Python flushes at exit: now to the null device
    closed.flush()
    monkeypatch.undo()
    closed.close()


def test_console_entry_point_and_help():
    done = subprocess.run(
        [sys.executable, "-m", "modnet", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for command in ("train", "transfer", "eval", "routes", "export"):
        assert command in done.stdout


def test_adapt_and_transfer_take_each_others_spellings():
    from modnet.cli import build_parser

    for spelling in ("--init", "--init-from"):
        args = build_parser().parse_args(["adapt", "runs/x", "--target", "t", spelling, "nearest"])
        assert args.init == "nearest"
    # and transfer's spelling of an anisotropic route
    for spelling in (["--anisotropic"], ["--route", "anisotropic"]):
        args = build_parser().parse_args(["adapt", "runs/x", "--target", "t", *spelling])
        assert args.anisotropic is True
    assert build_parser().parse_args(["adapt", "runs/x", "--target", "t"]).anisotropic is None
    # and transfer takes adapt's spellings, eval the training commands' --data-workers
    args = build_parser().parse_args(["transfer", "runs/x", "--task", "t", "--init", "nearest"])
    assert args.init_from == "nearest" and args.route is None
    args = build_parser().parse_args(["transfer", "runs/x", "--task", "t", "--anisotropic"])
    assert args.route == "anisotropic"
    assert build_parser().parse_args(["eval", "runs/x", "--data-workers", "0"]).workers == 0


def test_eval_scores_the_test_set_the_run_drew_with_its_seed(tmp_path, capsys):
    out = tmp_path / "seed1"
    argv = ["train", "--tasks", "synth_color,synth_size", *TINY, *FAST, "--seed", "1", "--out"]
    assert main([*argv, str(out)]) == 0
    recorded = json.loads((out / "results.json").read_text())["train"]["accuracy"]
    capsys.readouterr()
    assert main(["eval", str(out), "--test-limit", "40", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == recorded  # synthetic images and subset alike


def test_eval_notes_moved_data_whose_class_names_differ_from_training(tmp_path, capsys):
    from tests.test_data import write_folder

    for name, classes in (("pets", ("cat", "dog")), ("copy", ("cat", "dog"))):
        for split in ("train", "test"):
            write_folder(tmp_path / name, split, dict.fromkeys(classes, 4), size=(16, 16))
    swapped = tmp_path / "swapped"  # the same images, class folders that sort the other way
    for split in ("train", "test"):
        for old, new in (("cat", "zcat"), ("dog", "adog")):
            (swapped / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "pets" / split / old).rename(swapped / split / new)
        for old in ("cat", "dog"):
            (tmp_path / "copy" / split / old).rename(tmp_path / "pets" / split / old)
    run = tmp_path / "run"
    argv = ["train", "--tasks", f"folder:{tmp_path / 'pets'}", *TINY, "--epochs", "1"]
    assert main([*argv, "--batch-size", "8", "--no-progress", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", f"pets=folder:{tmp_path / 'pets'}"]) == 0
    assert "names its classes" not in capsys.readouterr().err
    assert main(["eval", str(run), "--data", f"pets=folder:{swapped}"]) == 0
    assert (
        f"modnet: --data pets=folder:{swapped} names its classes otherwise than the data task "
        "'pets' was trained on (0: 'adog' here, 'cat' in training; 1: 'zcat' here, 'dog' in "
        "training): labels are matched by class index, so check that the classes are the "
        "same and in the same order\n"
    ) in capsys.readouterr().err


def test_eval_of_a_model_saved_without_datasets_asks_for_them(tmp_path, capsys):
    import timm

    model = timm.create_model("modnet_conv_tiny", tasks={"a": 4}, depth=2, width=8, img_size=16)
    io.save_model(model, tmp_path / "saved")  # no task_info: no dataset recorded
    assert main(["eval", str(tmp_path / "saved")]) == 2
    assert capsys.readouterr().err == (
        f"modnet eval: error: {tmp_path / 'saved'} records no dataset for task 'a' (a model "
        "saved without task_info): pass --data a=SPEC, or save it with "
        "io.save_model(..., task_info=io.recorded_task_info(manifest, tasks)) with the "
        "manifest io.load_model returned for the model the task came from\n"
    )
    argv = ["eval", str(tmp_path / "saved"), "--data", "a=synth_shape", "--test-limit", "8"]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert 0.0 <= json.loads(out)["a"] <= 1.0
    assert err == (
        "modnet: a: no preprocessing recorded (a model saved without task_info): scored with "
        "the given data's own statistics and seed 0, which may differ from how the task was "
        "trained\n"
    )
