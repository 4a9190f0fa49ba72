"""Every option is checked before any work; data that looks like a mistake is refused at load."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from modnet.cli import main
from modnet.data import DataError, LoadOptions, load_npz
from modnet.errors import ConfigError, ModnetError
from modnet.options import check_model_options, create_model
from modnet.train import TrainConfig
from tests.test_run_dir import TINY, train_args


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lr", -1e-3, "--lr must be > 0, got -0.001"),
        ("lr", 0.0, "--lr must be > 0"),
        ("lr", math.nan, "--lr must be a finite number, got nan"),
        ("lr", math.inf, "--lr must be a finite number"),
        ("route_lr", -1.0, "--route-lr must be > 0"),
        ("head_lr", math.nan, "--head-lr must be a finite number"),
        ("weight_decay", -0.1, "--weight-decay must be >= 0"),
        ("grad_clip", -1.0, "--grad-clip must be > 0.*0 disables it"),
        ("log_every", 0, "--log-every must be at least 1, got 0"),
        ("eval_batch_size", 0, "--eval-batch-size must be at least 1"),
        ("epochs", 1.5, "--epochs must be an integer, got 1.5"),
        # once a traceback from the schedule's generator, after the run folder was made
        ("seed", 2**40 + 1, r"--seed must be between -1,099,511,627,776 and 1,099,511,627,776"),
        ("seed", -(2**70), "--seed must be between"),
        ("batch_size", 0, "--batch-size must be at least 1"),
        ("checkpoint_every", -1, "--checkpoint-every must be at least 0"),
        ("label_smoothing", 1.0, "--label-smoothing must be < 1"),
        ("train_limit", 0, "--train-limit must be at least 1"),
        ("tasks", ["synth_color", " "], "--tasks must be dataset specs"),
        ("optimizer", "adam", "unknown optimizer 'adam'"),
    ],
)
def test_training_options_are_validated(option, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{option: value})


def test_a_config_from_a_dict_refuses_unknown_keys_and_suggests_the_field():
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict({"epoch": 5})
    options = ", ".join(TrainConfig().to_dict())
    assert str(error.value) == (
        "unknown TrainConfig option 'epoch' (did you mean 'epochs'?): check the spelling; "
        f"the options are {options}"
    )
    with pytest.raises(ConfigError, match=r"^unknown TrainConfig options 'lrr' \(did you mean "
                       r"'lr'\?\), 'zzz': check the spelling"):  # fmt: skip
        TrainConfig.from_dict({"epochs": 5, "lrr": 0.1, "zzz": 1})
    with pytest.raises(
        ConfigError, match=r"^TrainConfig.from_dict needs a mapping of options, got"
    ):
        TrainConfig.from_dict(None)
    # a (height, width) pair builds a model, but training loads square images
    message = r"img_size must be an integer, got \(24, 32\) \(the data is loaded as square"
    with pytest.raises(ConfigError, match=message):
        check_model_options("modnet_conv_tiny", {"img_size": (24, 32)})
    # what a run stores (to_dict) reads back whole
    config = TrainConfig(epochs=5, lr=0.1, tasks=["synth_color"], grad_clip=None)
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert TrainConfig.from_dict({"epochs": 5}).epochs == 5


def test_grad_clip_zero_disables_clipping():
    assert TrainConfig(grad_clip=0).grad_clip is None
    assert TrainConfig(grad_clip=None).grad_clip is None
    assert TrainConfig(grad_clip=0.5).grad_clip == 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(width=0), "model option width must be >= 1, got 0"),
        (dict(width=2.5), "model option width must be an integer, got 2.5"),
        (dict(depth="abc"), "model option depth must be an integer, got 'abc'"),
        (dict(depth=True), "model option depth must be an integer"),
        (dict(exp_ratio=-1.0), "model option exp_ratio must be > 0, got -1.0"),
        (dict(exp_ratio=math.nan), "exp_ratio must be a finite number"),
        (dict(num_templates=0), "num_templates must be >= 1"),
        (
            dict(route="sparse"),
            "route='sparse' is not one of softmax, linear, sparsemax, hyper, hard",
        ),
        (dict(anisotropic="yes"), "anisotropic must be True or False"),
        (dict(hyper_normalize="tanh"), "hyper_normalize='tanh' is not one of .*sparsemax"),
        # hypernetwork options with another route would be saved and do nothing
        (
            dict(hyper_dim=16),
            "^model option hyper_dim=16 only applies to route=hyper, and the route is softmax: "
            "set route=hyper or leave hyper_dim out$",
        ),
        (
            dict(route="hard", hyper_normalize="softmax"),
            "hyper_normalize='softmax' only applies to route=hyper, and the route is hard",
        ),
        (dict(img_size=10, stem_stride=4), "img_size=10 must be divisible by stem_stride=4"),
        # the model's own stem_stride (2) counts when only img_size is given
        (dict(img_size=7), r"img_size=7 must be divisible by stem_stride=2 \(given: img_size=7\)"),
    ],
)
def test_model_options_are_validated_before_building(options, message):
    with pytest.raises(ConfigError, match=message):
        check_model_options("modnet_conv_tiny", options)


def test_unknown_model_and_unknown_option():
    with pytest.raises(ConfigError, match="unknown model 'modnet_conv_huge'.*modnet_conv_tiny"):
        check_model_options("modnet_conv_huge", {})
    with pytest.raises(ConfigError, match="unknown model option 'widht' for modnet_conv_tiny"):
        create_model("modnet_conv_tiny", dict(widht=8))
    model = create_model("modnet_conv_tiny", dict(width=8, depth=2, img_size=8))
    assert model.config["width"] == 8 and model.depth == 2
    # timm.create_model itself says the same in one line, with the options it takes
    import timm

    with pytest.raises(
        ConfigError, match=r"'embed_dimm' for modnet_vit_tiny \(did you mean embed_dim\?\).*"
        r"it takes .*embed_dim.*num_templates"
    ):  # fmt: skip
        timm.create_model("modnet_vit_tiny", embed_dimm=8)
    # every normalisation a hypernetwork has is accepted as a model option
    options = dict(width=8, depth=2, img_size=8, route="hyper", hyper_normalize="sparsemax")
    check_model_options("modnet_conv_tiny", options)
    assert create_model("modnet_conv_tiny", options).hypernet.normalize == "sparsemax"
    # a saved config carries the hypernetwork's defaults whatever the route: accepted
    saved = create_model("modnet_conv_tiny", dict(width=8, depth=2, img_size=8)).config
    check_model_options("modnet_conv_tiny", {k: v for k, v in saved.items() if "hyper" in k})


def test_the_largest_seeds_run_and_a_larger_one_is_refused_before_any_work(tmp_path, capsys):
    from modnet.train.schedule import MultiTaskSchedule

    for seed in (2**40, -(2**40)):
        assert TrainConfig(seed=seed).seed == seed
        schedule = MultiTaskSchedule([5, 3], 4, seed=seed)
        assert schedule._permutation(2, 1000, 8).shape == (8,)  # a 64-bit generator seed
    args = train_args(tmp_path / "run")
    assert main([*args, "--seed", "20000000000000"]) == 2
    assert "--seed must be between" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_empty_task_list_is_an_error_not_the_default_suite(tmp_path, capsys):
    for tasks in (",", "synth_color,,synth_size", " "):
        args = train_args(tmp_path / "run")
        args[args.index("--tasks") + 1] = tasks
        assert main(args) == 2
        assert "--tasks" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _npz(path, train_y, test_y, **extra):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_x=rng.integers(0, 255, (len(train_y), 8, 8, 3), dtype=np.uint8),
        train_y=np.asarray(train_y),
        test_x=rng.integers(0, 255, (len(test_y), 8, 8, 3), dtype=np.uint8),
        test_y=np.asarray(test_y),
        **extra,
    )
    return path


def test_a_stray_label_far_above_the_others_is_reported_at_load(tmp_path):
    labels = list(range(10)) * 3
    path = _npz(tmp_path / "digits.npz", labels + [1000, 1000], labels)
    with pytest.raises(DataError, match=r"label 1000 \(carried by 2 samples\).*next is 9"):
        load_npz(path, LoadOptions(img_size=8, in_chans=3))
    fine = _npz(tmp_path / "gaps.npz", [0, 1, 3, 4, 5], [0, 3, 5])  # a missing class is fine
    assert load_npz(fine, LoadOptions(img_size=8, in_chans=3)).num_classes == 6


def test_labels_counted_from_one_are_refused_unless_the_classes_are_given(tmp_path):
    labels = [1, 2, 3] * 4  # 3 classes: inferred as 4 with an empty class 0, chance 1/4
    path = _npz(tmp_path / "onebased.npz", labels, labels)
    with pytest.raises(DataError, match=r"no sample has label 0 \(labels span 1..3\).*subtract 1"):
        load_npz(path, LoadOptions(img_size=8, in_chans=3))
    from modnet.data import task_from_arrays

    x = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    y = torch.tensor(labels)
    options = LoadOptions(img_size=8, in_chans=3)
    kept = task_from_arrays(  # an empty class 0 on purpose
        "onebased", x, y, x, y, options, source={}, num_classes=4
    )
    assert kept.num_classes == 4
    # named classes are the classes (as for image folders): 4 names keep class 0 empty
    named = _npz(tmp_path / "named.npz", labels, labels, classes=np.array(["-", "a", "b", "c"]))
    assert load_npz(named, options).num_classes == 4
    fewer = _npz(tmp_path / "fewer.npz", labels, labels, classes=np.array(["a", "b"]))
    with pytest.raises(DataError, match=r"labels span 1..3, outside 0..1"):
        load_npz(fewer, options)
    with pytest.raises(DataError, match="2 class names for 4 classes"):
        task_from_arrays("x", x, y, x, y, options, source={}, num_classes=4, classes=["a", "b"])


def test_an_overlong_task_name_is_refused_when_the_data_is_loaded(tmp_path, capsys):
    path = _npz(tmp_path / f"{'x' * 245}.npz", [0, 1] * 8, [0, 1] * 4)
    with pytest.raises(DataError, match="is 245 characters long: at most 100"):
        load_npz(path, LoadOptions(img_size=8, in_chans=3))
    out = tmp_path / "run"
    assert main(["train", "--tasks", f"npz:{path}", *TINY, "--out", str(out)]) == 2
    assert "245 characters long" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_every_project_error_derives_from_modnet_error():
    from modnet.adapt import AdaptationError
    from modnet.errors import CheckpointError, DivergenceError, RunDirError

    for error in (ConfigError, DataError, AdaptationError, CheckpointError, RunDirError):
        assert issubclass(error, ModnetError) and issubclass(error, ValueError)
    assert issubclass(DivergenceError, ModnetError)


@pytest.mark.parametrize("weight", [math.nan, -1.0, "1"])
def test_adapt_source_weight_is_validated_first(tmp_path, weight):
    from modnet.adapt import adapt

    with pytest.raises(ConfigError, match="--source-weight must be a finite number >= 0"):
        adapt(tmp_path / "none", "synth_size-bg", ["synth_size"], source_weight=weight)


def test_a_run_records_relative_data_paths_so_it_evaluates_from_any_folder(
    tmp_path, monkeypatch, capsys
):
    from modnet import io
    from modnet.data import portable_spec
    from tests.test_run_dir import FAST, TINY

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    elsewhere.mkdir()
    _npz(work / "data" / "digits.npz", list(range(4)) * 16, list(range(4)) * 8)
    monkeypatch.chdir(work)
    assert portable_spec("npz:data/digits.npz") == f"npz:{work / 'data' / 'digits.npz'}"
    assert portable_spec("npz:missing.npz") == "npz:missing.npz"  # e.g. under the data root
    assert portable_spec("mnist") == "mnist" and portable_spec("folder:.") == "folder:."
    args = ["train", "--tasks", "npz:data/digits.npz", *TINY, *FAST]
    assert main([*args, "--out", "run"]) == 0
    trained = io.read_results(work / "run")["train"]
    _, manifest = io.load_model(work / "run")
    assert manifest["tasks"]["digits"]["dataset"] == f"npz:{work / 'data' / 'digits.npz'}"
    monkeypatch.chdir(elsewhere)  # where data/digits.npz does not exist
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval reads one training image: no warning about it
        assert main(["eval", str(work / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == trained["accuracy"]
    # and the run's config.yaml trains it again from here
    assert main(["train", "--config", str(work / "run" / "config.yaml"), "--out", "again"]) == 0
    assert io.read_results(elsewhere / "again")["train"]["accuracy"] == trained["accuracy"]
    # data that moved: eval says how to point at it, and --data does
    (work / "data" / "digits.npz").rename(elsewhere / "moved.npz")
    capsys.readouterr()
    assert main(["eval", str(work / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("modnet eval: error: no npz file at")
    assert err.endswith("; if the data moved, pass --data digits=SPEC")
    assert main(["eval", str(work / "run"), "--data", "digits=npz:moved.npz", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == trained["accuracy"]
    for bad, message in [
        ("digits", "--data expects TASK=SPEC (e.g. mnist=npz:data/mnist.npz), got 'digits'"),
        ("cats=npz:moved.npz", f"--data cats=...: {work / 'run'} has no task 'cats'"),
        ("digits=synth_color", "--data digits=synth_color has 6 classes, task 'digits' 4"),
    ]:
        assert main(["eval", str(work / "run"), "--data", bad]) == 2
        assert message in capsys.readouterr().err
    # another file of the same name is not the task to retrain: said so, not --overwrite
    (elsewhere / "other").mkdir()
    _npz(elsewhere / "other" / "digits.npz", list(range(4)) * 16, list(range(4)) * 8)
    assert main(["transfer", str(work / "run"), "--task", "npz:other/digits.npz"]) == 2
    assert (
        f"already has a task 'digits', from npz:{work / 'data' / 'digits.npz'}, not "
        "npz:other/digits.npz: a file or folder task takes its file's or folder's name, so "
        "rename this one"
    ) in capsys.readouterr().err
    # --init-from nearest reads every source's images: a moved one is named, with the way out
    _npz(elsewhere / "letters.npz", list(range(4)) * 16, list(range(4)) * 8)
    args = ["transfer", str(work / "run"), "--task", "npz:letters.npz", "--init-from"]
    assert main([*args, "nearest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no npz file at" in err
    assert err.startswith(
        "modnet transfer: error: --init-from nearest compares the new task with every task's "
        "images, and the images of task 'digits' cannot be read: no npz file at"
    )
    assert err.endswith("; name the source instead (--init-from TASK)")
    assert not list((work / "run" / "checkpoints").glob("transfer-*"))
