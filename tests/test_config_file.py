"""``--config run.yaml``: values from the file, overridden by flags; one model-option spelling."""

from pathlib import Path

import pytest
import yaml

import modnet
from modnet.cli import build_parser, main
from modnet.commands import adapt, train, transfer
from modnet.commands.bench import parse_kwargs
from modnet.errors import ConfigError
from modnet.train import TrainConfig


def parse(*argv):
    return build_parser().parse_args(list(argv))


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


FILE = """\
epochs: 5
lr: 3e-3            # YAML reads this as a string: converted like the flag would
batch-size: 16
tasks: [synth_color, synth_size]
model_kwargs: {depth: 3, width: 8, route: hard}
progress: false
grad_clip: null
"""


def test_file_values_fill_what_the_flags_do_not_set(tmp_path):
    path = write(tmp_path, FILE)
    options = train.options(parse("train", "--config", path))
    assert options["epochs"] == 5 and options["lr"] == 0.003 and options["batch_size"] == 16
    assert options["tasks"] == ["synth_color", "synth_size"]
    assert options["model_kwargs"] == {"depth": 3, "width": 8, "route": "hard"}
    assert options["progress"] is False and options["grad_clip"] is None
    assert options["seed"] == TrainConfig().seed and options["model"] == "modnet_conv_tiny"
    assert TrainConfig(**options).lr == 0.003


def test_flags_override_the_file_before_or_after_it(tmp_path):
    path = write(tmp_path, FILE)
    for argv in (
        ["train", "--epochs", "2", "--config", path, "--model-arg", "depth=6", "--progress"],
        ["train", "--config", path, "--epochs", "2", "--model-arg", "depth=6", "--progress"],
        ["train", "--model-arg", "depth=6", "--epochs", "2", "--progress", "--config", path],
    ):
        options = train.options(parse(*argv))
        assert options["epochs"] == 2, argv
        assert options["model_kwargs"] == {"depth": 6, "width": 8, "route": "hard"}, argv
        assert options["progress"] is True and options["lr"] == 0.003, argv


def test_a_flag_equal_to_the_default_still_overrides_the_file(tmp_path):
    path = write(tmp_path, "seed: 7\nepochs: 5\n")
    options = train.options(parse("train", "--seed", "0", "--epochs", "2", "--config", path))
    assert options["seed"] == 0 and options["epochs"] == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochz: 3\n", "'epochz' in config file is not an option of this command"),
        ("out: runs/x\n", "'out' in config file is not an option"),
        ("epochs: three\n", "epochs must be int, got 'three'"),
        ("epochs: 2.5\n", "epochs must be int, got 2.5"),
        ("optimizer: adam\n", "optimizer must be one of adamw, sgd, got 'adam'"),
        ("compile: yes please\n", "compile must be true or false"),
        ("model_kwargs: [depth=3]\n", "model_kwargs must be a mapping"),
        ("[1, 2]\n", "must be a mapping of option: value"),
        ("epochs: [1\n", "is not valid YAML (line 2)"),
    ],
)
def test_a_bad_config_file_is_one_clear_error(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SystemExit) as exit_info:
        parse("train", "--config", path)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value", ['"no"', "0", "1", '"false"', "off please"])
def test_a_switch_in_a_config_file_must_be_true_or_false(tmp_path, capsys, value):
    # update_shared: "no" once counted as yes and retrained the pool the old tasks share
    path = write(tmp_path, f"task: synth_shape\nupdate_shared: {value}\n")
    with pytest.raises(SystemExit) as exit_info:
        parse("transfer", "RUN", "--config", path)
    assert exit_info.value.code == 2
    assert "update_shared must be true or false, got" in capsys.readouterr().err
    for given in (True, False):
        path = write(tmp_path, f"task: synth_shape\nupdate_shared: {str(given).lower()}\n")
        assert (
            transfer.options(parse("transfer", "RUN", "--config", path))["update_shared"] is given
        )


def test_a_relative_data_root_is_saved_absolute(tmp_path, monkeypatch):
    # eval and --config replays read the saved root from any folder
    monkeypatch.chdir(tmp_path)
    options = train.options(parse("train", "--data-root", "data"))
    assert options["data_root"] == str(tmp_path / "data")
    assert train.options(parse("train"))["data_root"] is None  # $MODNET_DATA_ROOT stays a default


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse("train", "--config", str(tmp_path / "nope.yaml"))
    assert f"cannot read config file {tmp_path / 'nope.yaml'}" in capsys.readouterr().err
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00bin")
    with pytest.raises(SystemExit):
        parse("train", "--config", str(tmp_path / "binary.yaml"))
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'binary.yaml'} is not a text file: give a YAML file" in err


def test_transfer_and_adapt_take_their_own_options_from_the_file(tmp_path):
    path = write(tmp_path, "task: synth_shape\ntrain: route\ngrow: 1\nepochs: 3\n")
    options = transfer.options(parse("transfer", "RUN", "--config", path, "--grow", "2"))
    assert (options["task"], options["train"], options["grow"]) == ("synth_shape", "route", 2)
    assert options["epochs"] == 3 and options["init_from"] is None
    assert "model" not in options and "tasks" not in options  # the run's model is given
    with pytest.raises(SystemExit):  # a model option is not a transfer option
        parse("transfer", "RUN", "--config", write(tmp_path, "model: modnet_vit_tiny\n", "m.yaml"))
    with pytest.raises(ConfigError, match="transfer needs the new task: pass --task"):
        transfer.options(parse("transfer", "RUN"))
    path = write(tmp_path, "target: synth_size-color\nobjective_options: {diversity: 0.5}\n", "a")
    options = adapt.options(parse("adapt", "RUN", "--config", path, "--objective-arg", "hidden=8"))
    assert options["target"] == "synth_size-color" and options["objective"] == "moments"
    assert options["objective_options"] == {"diversity": 0.5, "hidden": 8}
    with pytest.raises(ConfigError, match="adapt needs the target domain"):
        adapt.options(parse("adapt", "RUN"))


def test_one_spelling_for_model_options_in_train_and_bench(capsys):
    pairs = ["depth=3", "route=softmax", "ratio=4.5"]
    expected = {"depth": 3, "route": "softmax", "ratio": 4.5}
    assert train.options(parse("train", "--model-arg", *pairs))["model_kwargs"] == expected
    repeated = [x for pair in pairs for x in ("--model-arg", pair)]
    assert train.options(parse("train", *repeated))["model_kwargs"] == expected
    assert parse_kwargs(parse("bench", "--model-arg", *pairs).model_kwargs) == expected
    assert "deprecated" not in capsys.readouterr().err
    old = parse("bench", "--model-kwargs", *pairs)  # the old spelling: hidden, still works
    assert parse_kwargs(old.model_kwargs) == expected
    assert "--model-kwargs is deprecated: use --model-arg" in capsys.readouterr().err
    assert (
        "--model-kwargs"
        not in build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    )
    with pytest.raises(ValueError, match="--model-arg expects KEY=VALUE, got 'depth'"):
        train.options(parse("train", "--model-arg", "depth"))


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"modnet {modnet.__version__}"
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["dynamic"] == ["version"]  # one source: modnet.__version__
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "modnet.__version__"}


def test_a_saved_config_reads_back_to_the_same_options(tmp_path):
    from modnet.commands._options import save_config

    options = train.options(parse("train", "--config", write(tmp_path, FILE), "--seed", "3"))
    saved = save_config(tmp_path / "run", "train", options, "train")
    assert saved == tmp_path / "run" / "config.yaml"
    assert yaml.safe_load(saved.read_text()) == options
    assert train.options(parse("train", "--config", str(saved))) == options
    transfer_options = transfer.options(parse("transfer", "RUN", "--task", "synth_shape"))
    path = save_config(tmp_path / "run", "transfer", transfer_options, "transfer-synth_shape")
    assert path.name == "config-transfer-synth_shape.yaml"
    assert transfer.options(parse("transfer", "RUN", "--config", str(path))) == transfer_options


def test_every_training_option_has_a_flag_that_its_errors_name(tmp_path, capsys):
    """A config key without a flag made its error name a flag that did not exist."""
    from dataclasses import fields

    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for field in fields(TrainConfig):
        if field.name not in ("model", "model_kwargs", "tasks"):  # --model, --model-arg, --tasks
            assert f"--{field.name.replace('_', '-')}" in help_text, field.name
    options = train.options(parse("train", "--in-memory-mb", "0", "--eval-micro-batch", "8"))
    assert options["in_memory_mb"] == 0.0 and options["eval_micro_batch"] == 8
    assert main(["train", "--data-workers", "-1", "--out", str(tmp_path / "run")]) == 2
    assert "--data-workers must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
