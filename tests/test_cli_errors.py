"""User errors are one line with exit code 2; genuine failures keep their traceback;
divergence stops a run; exports say what they trust."""

import errno
import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modnet import io
from modnet.cli import main
from modnet.errors import CheckpointError, DivergenceError
from modnet.export import load_safe, load_transform, shareable
from modnet.train import TrainConfig
from modnet.train.divergence import DivergenceGuard
from tests.conftest import images, tiny_conv
from tests.test_run_dir import FAST, finished, train_args  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"modnet {command}: error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model-arg", "width=0"], "model option width must be >= 1, got 0"),
        (["--model-arg", "depth=abc"], "model option depth must be an integer, got 'abc'"),
        (["--model-arg", "colour=red"], "unknown model option 'colour'"),
        (["--model-arg", "width"], "--model-arg expects KEY=VALUE"),
        (["--model-arg", "hyper_dim=4"], "hyper_dim=4 only applies to route=hyper"),
        (["--model-arg", "img_size=7"], "img_size=7 must be divisible by stem_stride=2"),
        (["--log-every", "0"], "--log-every must be at least 1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "-0.1"], "--lr must be > 0"),
        (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--grad-clip", "-1"], "--grad-clip must be > 0"),
        (["--model", "resnet18"], "unknown model 'resnet18'"),
        (["--tasks", "synth_color, synth_color"], "'synth_color' is listed twice"),
    ],
)
def test_bad_training_options_are_one_line_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main([*train_args(out), *extra]) == 2
    assert message in one_line_error(capsys, "train")
    assert not out.exists()


def test_two_files_of_one_name_are_refused_naming_both(tmp_path, capsys):
    generator = np.random.default_rng(0)
    specs = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        arrays = {
            f"{split}_{kind}": (
                generator.integers(0, 256, (n, 8, 8), dtype=np.uint8) if kind == "x" else
                np.arange(n) % 2
            )
            for split, n in (("train", 8), ("test", 4))
            for kind in ("x", "y")
        }  # fmt: skip
        np.savez(tmp_path / folder / "digits.npz", **arrays)
        specs.append(f"npz:{tmp_path / folder / 'digits.npz'}")
    out = tmp_path / "run"
    assert main([*train_args(out), "--tasks", ",".join(specs)]) == 2
    assert (
        f"{specs[0]!r} and {specs[1]!r} are both task 'digits' (a file or folder task takes "
        "its file's or folder's name): rename one of them"
    ) in one_line_error(capsys, "train")
    assert not out.exists()


def test_eval_and_export_errors_are_one_line(finished, tmp_path, capsys, monkeypatch):  # noqa: F811
    assert main(["eval", str(finished), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in one_line_error(capsys, "eval")
    assert main(["eval", str(finished), "--micro-batch", "-1"]) == 2
    assert "--micro-batch must be 0 (one pass per batch) or more" in one_line_error(capsys, "eval")
    assert main(["eval", str(finished), "--task", "synth_color", "--data", "synth_size=x"]) == 2
    assert (
        "--data synth_size=...: task 'synth_size' is not evaluated (--task synth_color): add "
        "--task synth_size"
    ) in one_line_error(capsys, "eval")
    # 0: each batch in one pass, as in modnet bench; the same accuracy as micro-batches
    evaluate_module = importlib.import_module("modnet.train.evaluate")

    passes, predict = [], evaluate_module.predict
    monkeypatch.setattr(
        evaluate_module,
        "predict",
        lambda model, x, task, micro, precision: (
            passes.append(micro) or predict(model, x, task, micro, precision)
        ),
    )
    accuracy = []
    for micro in ("0", "16"):
        assert (
            main(["eval", str(finished), "--micro-batch", micro, "--batch-size", "8", "--json"])
            == 0
        )
        accuracy.append(json.loads(capsys.readouterr().out))
    assert set(passes) == {8, 16}  # 0 -> the whole --batch-size batch in one pass
    assert accuracy[0] == accuracy[1]
    model_dir = tmp_path / "model"
    io.save_model(tiny_conv(tasks={"a": 3}), model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["tasks"]["a"]["num_classes"] = "three"
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["eval", str(model_dir)]) == 2
    line = one_line_error(capsys, "eval")
    assert "manifest.json is damaged: tasks['a']['num_classes'] should be a non-negative" in line
    manifest["pool_chunks"] = "3"
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    assert main(["export", str(model_dir), "--task", "a"]) == 2
    assert "'pool_chunks' should be a non-empty list" in one_line_error(capsys, "export")


def test_a_genuine_failure_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr("modnet.train.loop.Trainer.training_loss", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(train_args(tmp_path / "run"))


def test_a_full_disk_names_the_path(tmp_path, monkeypatch, capsys):
    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("modnet.io.checkpoint.save_file", full)
    out = tmp_path / "run"
    assert main(train_args(out)) == 2
    line = one_line_error(capsys, "train")
    assert f"no space left on device while writing {out / 'checkpoints' / 'train-step'}" in line
    assert not list((out / "checkpoints").glob(".*"))  # no temporary folder left behind


def test_a_subprocess_user_error_has_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "modnet", *train_args(tmp_path / "r"), "--model-arg", "width=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "modnet train: error: model option width must be >= 1, got 0"
    ]


# ----------------------------------------------------------------------- 8. divergence
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, optimizer):
    out = tmp_path / "run"
    extra = ["--lr", "1e3", "--optimizer", optimizer, "--grad-clip", "0"]
    args = [*train_args(out), *extra, "--checkpoint-every", "1", "--epochs", "3"]
    assert main(args) == 2
    line = one_line_error(capsys, "train")
    assert "training diverged in phase 'train' at step " in line
    assert "--lr 100, now 1000" in line and "--grad-clip 1" in line
    step = int(line.split("at step ")[1].split(":")[0])
    latest = io.latest_checkpoint(out)
    state = io.load_trainer_state(latest)
    assert not state["done"] and state["step"] < step
    model, _ = io.load_model(out)
    assert all(
        torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
    )
    assert not (out / "results.json").exists()


def test_non_finite_weights_or_statistics_are_never_checkpointed():
    guard = DivergenceGuard(TrainConfig(lr=0.5, grad_clip=1.0), "train")
    model = tiny_conv(tasks={"a": 3})
    guard.check_model(model, 7)
    buffer = next(n for n, _ in model.named_buffers() if n.endswith("running_var"))
    model.get_buffer(buffer).fill_(math.inf)
    with pytest.raises(DivergenceError, match=f"at step 7: buffer {buffer} is not finite"):
        guard.check_model(model, 7)
    with pytest.raises(DivergenceError, match="step 1: the loss became nan.*--lr 0.05"):
        guard.check_loss(math.nan, 0)
    guard.check_loss(2.0, 0)
    guard.check_loss(150.0, 1)  # large, not yet 100x the start
    with pytest.raises(DivergenceError, match="step 3: the loss exploded to 250"):
        guard.check_loss(250.0, 2)


# ---------------------------------------------------------------------------- 12. trust
def test_export_help_and_readme_warn_that_pt2_files_can_run_code(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "can execute code stored in the file" in text and "--format safetensors" in text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Loading a `.pt2` file with `torch.export.load` can execute code" in readme


def test_safe_export_round_trips_the_logits(finished, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "color"
    assert main(["export", str(finished), "--task", "synth_color", "--format", "safetensors",
                 "--out", str(out)]) == 0  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    net = load_safe(out)
    model, manifest = io.load_model(finished, tasks=["synth_color"])
    x = images(model, batch=5)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    # the preprocessing goes with the network: raw images -> the same input as in training
    record = manifest["tasks"]["synth_color"]["transform"]
    assert net.transform == record == load_transform(out)
    pt2 = tmp_path / "color.pt2"
    assert main(["export", str(finished), "--task", "synth_color", "--out", str(pt2)]) == 0
    assert load_transform(pt2) == record
    with pytest.raises(CheckpointError, match="cannot read an export at"):
        load_transform(tmp_path / "nothing.pt2")
    # an export leaves out the exporting machine's paths
    local = {"mean": [0.5], "source": {"dataset": "usps", "root": "/data", "base": {"path": "/d"}}}
    assert shareable(local) == {"mean": [0.5], "source": {"dataset": "usps", "base": {}}}


def test_export_never_replaces_a_file_at_out_unless_told(finished, tmp_path, capsys):  # noqa: F811
    mine = tmp_path / "notes.pt2"
    mine.write_text("precious")
    export = ["export", str(finished), "--task", "synth_color", "--out"]
    assert main([*export, str(mine)]) == 2
    line = one_line_error(capsys, "export")
    assert line.endswith(
        f"{mine} already exists: choose another --out, or pass --overwrite to replace it"
    )
    assert mine.read_text() == "precious"
    assert main([*export, str(tmp_path / "notes.txt")]) == 2
    assert "is not a .pt2 file path" in one_line_error(capsys, "export")
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert main([*export, str(folder), "--format", "safetensors"]) == 2
    assert f"{folder / 'config.json'} already exists" in one_line_error(capsys, "export")
    assert (folder / "config.json").read_text() == "{}"
    assert main([*export, str(mine), "--overwrite"]) == 0
    assert torch.export.load(str(mine)).module() is not None
    # the run's own export folder is always replaced
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for _ in range(2):
        assert main(["export", str(run), "--task", "synth_color", "--format", "safetensors"]) == 0
    assert sorted(p.name for p in (run / "export" / "synth_color").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_nothing_is_written_into_checkpoints_modnet_prunes(finished, tmp_path, capsys):  # noqa: F811
    checkpoint = io.latest_checkpoint(finished)
    before = sorted(p.name for p in checkpoint.rglob("*"))
    export = ["export", str(finished), "--task", "synth_color"]
    for args, option in (
        (["routes", str(checkpoint)], "the default --out"),
        (["plot", str(finished), "--out", str(checkpoint / "figs")], "--out"),
        (["export", str(checkpoint), "--task", "synth_color"], "the default --out"),
        ([*export, "--out", str(checkpoint / "m.pt2")], "--out"),
        ([*export, "--format", "safetensors", "--out", str(checkpoint)], "--out"),
    ):
        assert main(args) == 2
        line = one_line_error(capsys, args[0])
        assert f"{option} {checkpoint}" in line
        assert line.endswith(
            f"is inside the checkpoints of the run {finished.absolute()}, which modnet prunes "
            "as the run goes on: pass --out FOLDER outside them"
        )
    assert sorted(p.name for p in checkpoint.rglob("*")) == before
    # a checkpoint is read as before, with --out elsewhere
    assert main(["routes", str(checkpoint), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "routes.png").is_file()


def test_eval_refuses_a_diverged_checkpoint(tmp_path, capsys):
    model = tiny_conv(tasks={"a": 3})
    buffer = next(n for n, _ in model.named_buffers() if n.endswith("running_var"))
    model.get_buffer(buffer).fill_(math.inf)
    io.save_model(model, tmp_path / "model")
    assert main(["eval", str(tmp_path / "model")]) == 2
    line = one_line_error(capsys, "eval")
    assert f"holds non-finite values ({buffer}): its training diverged" in line


def test_argument_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--lr", "fast"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "modnet train: error: argument --lr: invalid float value: 'fast' (see modnet train --help)"
    ]


def test_a_mistyped_option_is_named_by_its_command_with_the_closest_option(capsys):
    for argv, expected in [
        (["train", "--epocs", "1"], "modnet train: error: unrecognized arguments: --epocs 1; "
         "did you mean --epochs? (see modnet train --help)"),
        (["eval", "run", "--tset-limit=3", "--jsn"], "modnet eval: error: unrecognized "
         "arguments: --tset-limit=3 --jsn; did you mean --test-limit for --tset-limit, --json "
         "for --jsn? (see modnet eval --help)"),
        # an abbreviation is not taken: it would bind to whatever option it prefixes
        (["train", "--epoch", "1"], "modnet train: error: unrecognized arguments: --epoch 1; "
         "did you mean --epochs? (see modnet train --help)"),
        # an abbreviation gets the options it begins, not the nearest spelling (--help)
        (["train", "--ep", "1"], "modnet train: error: unrecognized arguments: --ep 1; "
         "did you mean --epochs? (see modnet train --help)"),
        (["train", "--t", "x"], "modnet train: error: unrecognized arguments: --t x; "
         "did you mean --tasks or --test-limit or --train-limit? (see modnet train --help)"),
        # a model option given to a command that reads the model from a run
        (["transfer", "run", "--task", "t", "--model-arg", "depth=4"], "modnet transfer: error: "
         "--model-arg is an option of `modnet train`: `modnet transfer` takes the model "
         "(family, depth, width, pool) from the run it is given (see modnet transfer --help)"),
        (["adapt", "run", "--target", "t", "--model=modnet_vit_tiny"], "modnet adapt: error: "
         "--model is an option of `modnet train`: `modnet adapt` takes the model "
         "(family, depth, width, pool) from the run it is given (see modnet adapt --help)"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.strip() == expected


def test_model_args_read_true_and_false_in_any_case_as_yaml_does():
    from modnet.commands._options import parse_model_args

    parsed = parse_model_args(["anisotropic=true", "straight_through=FALSE", "depth=8"])
    assert parsed == {"anisotropic": True, "straight_through": False, "depth": 8}
    assert parse_model_args(["route=hard", "drop_rate=0.1"]) == {"route": "hard", "drop_rate": 0.1}


@pytest.mark.parametrize(
    "command, expected",
    [
        ("train", "modnet train: interrupted; the run keeps its last checkpoint: the same "
         "command resumes it"),
        ("eval", "modnet eval: interrupted"),
    ],
)  # fmt: skip
def test_ctrl_c_is_one_line_and_says_how_a_run_resumes(command, expected, capsys, monkeypatch):
    import importlib

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"modnet.commands.{command}"), "run", interrupted)
    argv = [command, "runs/x"] if command == "eval" else [command]
    assert main(argv) == 130
    assert capsys.readouterr().err.splitlines() == [expected]


# ------------------------------------------------ model values, output paths, file kinds
# no num_templates given: top_k is checked against the model's own (4)
SMALL = ["train", "--tasks", "synth_color", "--model-arg", "depth=2", "width=8", "img_size=16"]
ACTIVATIONS = (  # timm's activation names, which an unknown act= is told
    "celu, elu, gelu, gelu_tanh, hard_mish, hard_sigmoid, hard_swish, hardsigmoid, hardswish, "
    "identity, leaky_relu, mish, prelu, quick_gelu, relu, relu6, selu, sigmoid, silu, swish, tanh"
)


@pytest.mark.parametrize(
    "value, message",
    [
        ("route_options={'top_k': 9}", "model option route_options: top_k must be an integer "
         "in 1..num_templates=4 (the templates each layer keeps), got 9"),
        ("route_options={'top_k': 2.5}", "model option route_options: top_k must be an integer "
         "in 1..num_templates=4 (the templates each layer keeps), got 2.5"),
        ("act=nosuch", f"unknown activation act='nosuch': choose one of {ACTIVATIONS}"),
    ],
)  # fmt: skip
def test_a_value_the_model_refuses_is_one_line_before_any_work(tmp_path, capsys, value, message):
    out = tmp_path / "run"
    assert main([*SMALL, "--model-arg", value, *FAST, "--out", str(out)]) == 2
    assert one_line_error(capsys, "train") == f"modnet train: error: {message}"
    assert not out.exists()


def test_a_value_only_the_model_refuses_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    # what the model's construction raises for a value, without a message of its own
    import timm

    def strict(name, **options):
        if options.get("width") == 9:
            raise KeyError("width 9 is odd")
        return timm.models.create_model(name, **options)

    monkeypatch.setattr("modnet.options.timm.create_model", strict)
    out = tmp_path / "run"
    assert main([*SMALL, "--model-arg", "width=9", *FAST, "--out", str(out)]) == 2
    assert one_line_error(capsys, "train") == (
        "modnet train: error: modnet_conv_tiny cannot be built with the model option width=9 "
        "(KeyError: 'width 9 is odd'): give another value (--model-arg KEY=VALUE)"
    )
    assert not out.exists()


def test_a_value_the_model_refuses_leaves_an_existing_run_and_bench_alone(
    finished,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = io.latest_checkpoint(run)
    assert main([*train_args(run), "--overwrite", "--model-arg", "act=nosuch"]) == 2
    assert "unknown activation act='nosuch'" in one_line_error(capsys, "train")
    assert io.latest_checkpoint(run) == before  # --overwrite cleared nothing
    bench = ["bench", "--model", "modnet_conv_tiny", "--batch-size", "2", "--rounds", "1"]
    assert main([*bench, "--warmup", "0", "--model-arg", "act=nosuch"]) == 2
    assert one_line_error(capsys, "bench") == (
        f"modnet bench: error: unknown activation act='nosuch': choose one of {ACTIVATIONS}"
    )

    # a model that fails to build whatever its options is a bug: it keeps its traceback
    def broken(*args, **kwargs):
        raise KeyError("a bug in the family")

    monkeypatch.setattr("modnet.options.timm.create_model", broken)
    with pytest.raises(KeyError, match="a bug in the family"):
        main([*SMALL, "--model-arg", "act=gelu", *FAST, "--out", str(tmp_path / "other")])


def test_an_output_path_that_cannot_be_created_is_refused_before_any_work(
    finished,  # noqa: F811
    tmp_path,
    capsys,
):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    inside = f"{afile} is a file, not a folder: choose a path that is not inside {afile}"
    for command, argv, option, path in [
        ("routes", ["routes", str(finished)], "--out", afile / "sub"),
        ("plot", ["plot", str(finished)], "--out", afile / "sub"),
        ("train", train_args(tmp_path / "unused")[:-2], "--out", afile / "sub"),
        ("export", ["export", str(finished), "--task", "synth_color"], "--out", afile / "x.pt2"),
        ("export", ["export", str(finished), "--task", "synth_color", "--format",
                    "safetensors"], "--out", afile / "x"),
        ("bench", ["bench", "--model", "modnet_conv_tiny", "--batch-size", "2", "--rounds",
                   "1", "--warmup", "1"], "--results-file", afile / "x.csv"),
    ]:  # fmt: skip
        assert main([*argv, option, str(path)]) == 2, command
        captured = capsys.readouterr()
        assert captured.out == "", command  # nothing trained or measured: nothing printed
        assert captured.err == (
            f"modnet {command}: error: {option} {path} cannot be created: {inside}\n"
        )
    assert main([*train_args(afile)]) == 2
    assert one_line_error(capsys, "train") == (
        f"modnet train: error: {afile} is a file, not a run directory: choose another --out"
    )
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    if Path("/proc/self").is_dir():  # a folder in which nothing can be created
        assert main(["routes", str(finished), "--out", "/proc/nope"]) == 2
        assert one_line_error(capsys, "routes") == (
            "modnet routes: error: --out /proc/nope cannot be written: nothing can be created "
            "in /proc (No such file or directory): choose a folder you can write to"
        )


def test_check_writable_creates_nothing(tmp_path):
    from modnet.commands._options import check_writable

    assert check_writable(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"
    assert check_writable(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []  # its trial folder is gone


def test_a_path_the_file_system_refuses_is_one_line_as_a_last_resort(capsys, monkeypatch):
    def refused(args):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", "afile/sub")

    monkeypatch.setattr(importlib.import_module("modnet.commands.discard"), "run", refused)
    assert main(["discard", "runs/x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "modnet discard: error: cannot use afile/sub (Not a directory): check the path or "
        "choose another"
    ]

    def missing(args):  # a missing file may be modnet's own: a bug keeps its traceback
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    monkeypatch.setattr(importlib.import_module("modnet.commands.discard"), "run", missing)
    with pytest.raises(FileNotFoundError):
        main(["discard", "runs/x"])


def test_a_file_given_for_the_run_is_named_a_file_by_every_command(tmp_path, capsys):
    afile = tmp_path / "good.npz"
    afile.write_text("not a run")
    reads = f"{afile} is a file: give a run or model directory"  # what eval has always said
    writes = (
        f"{afile} is a file, not a run directory: give the folder that `modnet train --out` wrote"
    )
    for command, extra, message in [
        ("eval", [], reads),
        ("routes", [], reads),  # not "--out good.npz/routes.png cannot be created"
        ("plot", [], reads),
        ("routes", ["--out", str(tmp_path / "figs")], reads),
        ("export", ["--task", "synth_color"], reads),
        ("discard", [], writes),  # not "is not a modnet run directory: nothing to discard"
        ("transfer", ["--task", "synth_shape"], writes),
        ("adapt", ["--target", "synth_shape"], writes),
    ]:
        assert main([command, str(afile), *extra]) == 2, command
        assert one_line_error(capsys, command) == f"modnet {command}: error: {message}"
    assert afile.read_text() == "not a run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz"]  # nothing written


def test_a_target_no_task_of_the_run_shares_classes_with_is_refused_for_what_it_is(
    finished,  # noqa: F811
    tmp_path,
    capsys,
):
    run = tmp_path / "run"
    shutil.copytree(finished, run)  # synth_color (6 classes) and synth_size (3)
    before = io.latest_checkpoint(run)
    assert main(["adapt", str(run), "--target", "synth_shape", *FAST]) == 2
    assert one_line_error(capsys, "adapt") == (
        "modnet adapt: error: the target 'synth_shape' has 4 classes but the run's tasks have "
        "3 (synth_size), 6 (synth_color): sources and target must share one label space, so "
        "no task of this run can be a source: adapt a run that has a task with the target's "
        "4 classes, or choose a target with the classes of one of the run's tasks"
    )  # not "name the sources with --sources", which the next refusal answers
    assert main(["adapt", str(run), "--target", "synth_shape", "--sources", "synth_color"]) == 2
    assert "sources and target must share one label space" in one_line_error(capsys, "adapt")
    assert io.latest_checkpoint(run) == before

    from types import SimpleNamespace

    from modnet.adapt.api import _no_shared_label_space

    model = SimpleNamespace(task_classes={"a": 4, "b": 4})
    target = SimpleNamespace(name="synth_color", num_classes=6)
    assert _no_shared_label_space(model, ["a", "b"], target).startswith(
        "the target 'synth_color' has 6 classes but the run's tasks (a, b) have 4: sources "
    )


def test_a_file_given_for_a_run_a_data_root_or_an_archive_is_named_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not data")
    assert main(["transfer", str(afile), "--task", "synth_shape", *FAST]) == 2
    assert one_line_error(capsys, "transfer") == (
        f"modnet transfer: error: {afile} is a file, not a run directory: give the folder "
        "that `modnet train --out` wrote"
    )
    out = tmp_path / "run"
    assert main([*train_args(out), "--tasks", "mnist", "--data-root", str(afile)]) == 2
    assert f"the data root {afile} is a file, not a folder: pass --data-root DIR" in (
        one_line_error(capsys, "train")
    )
    assert main([*train_args(out), "--tasks", f"npz:{afile}"]) == 2
    assert one_line_error(capsys, "train") == (
        f"modnet train: error: cannot read {afile} as an npz archive: it is not one (not a zip "
        "file of arrays): write it with numpy.savez(path, train_x=..., train_y=..., "
        "test_x=..., test_y=...)"
    )
    assert not out.exists()


def test_a_transfer_that_would_train_nothing_is_one_line(finished, tmp_path, capsys):  # noqa: F811
    latest = (finished / "LATEST").read_text()
    args = ["transfer", str(finished), "--task", "synth_shape", *FAST]
    assert main([*args, "--train", "norm", "--init-from", "synth_color"]) == 2
    assert one_line_error(capsys, "transfer").endswith(
        "--train norm alone trains no parameter: the norm statistics are re-estimated while "
        "something trains; add route or head (e.g. --train route,norm)"
    )
    hard = tmp_path / "hard"
    assert main(train_args(hard, "--model-arg", "route=hard")) == 0
    capsys.readouterr()
    assert main(["transfer", str(hard), "--task", "synth_shape", *FAST, "--train", "route"]) == 2
    # after the warning that the head stays random: the refusal, in one line
    assert capsys.readouterr().err.splitlines()[-1] == (
        "modnet transfer: error: --train norm,route trains no parameter of task 'synth_shape' "
        "(a hard route holds template indices, not weights): add head to --train"
    )
    assert (finished / "LATEST").read_text() == latest
    assert "synth_shape" not in io.read_results(hard)


@pytest.mark.slow  # trains a run, then transfers
def test_a_hard_route_run_says_its_transfer_trains_no_route(tmp_path, capsys):
    hard = tmp_path / "hard"
    assert main(train_args(hard, "--model-arg", "route=hard")) == 0
    capsys.readouterr()
    args = ["transfer", str(hard), "--task", "synth_shape", *FAST, "--init-from", "synth_color"]
    assert main(args) == 0  # the default --train route,head: only the head trains
    assert capsys.readouterr().err.splitlines()[0] == (
        "modnet: warning: the route of 'synth_shape' is hard (a fixed block order, not "
        "weights), so --train route trains nothing for it (trained: head): a run made with "
        "--model-arg route=soft (or another weighted route) learns routes"
    )
    model, _ = io.load_model(hard)
    head = sum(p.numel() for p in model.heads["synth_shape"].parameters())
    assert io.read_results(hard)["transfer-synth_shape"]["trained_parameters"] == head
