"""adapt's options are checked before any work, and its refusals name the fix.

The runs here are written directly (``io.save_checkpoint`` of an untrained tiny
model whose tasks record their datasets): every check under test happens before
adaptation loads the sources' data or trains, so nothing trains.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from modnet import io
from modnet.adapt import (
    OBJECTIVES,
    AdaptationError,
    adapt,
    make_objective,
    objective_names,
    reestimate_norm_stats,
)
from modnet.cli import main
from modnet.errors import ConfigError, RunDirError
from tests.conftest import tiny_conv, tiny_vit
from tests.test_cli_errors import one_line_error

SOURCES = {"synth_size": 3, "synth_size-bg": 3}
TARGET = "synth_size-noise"
GRADIENT_OBJECTIVES = "moments, entropy, adversarial, pseudo_label, sliced_wasserstein"


def write_run(run_dir, model) -> None:
    """A finished run of ``model``, its tasks recorded as trained on ``SOURCES``."""
    for name, classes in SOURCES.items():
        model.add_task(name, classes)
    info = {name: {"dataset": name, "phase": "train"} for name in SOURCES}
    state = {"phase": "train", "done": True}
    io.save_checkpoint(run_dir, "train-step0000008", model, state, task_info=info)


@pytest.fixture
def conv_run(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, tiny_conv(img_size=16, num_classes=None))
    return run_dir


def adapt_args(run_dir, *extra) -> list[str]:
    return ["adapt", str(run_dir), "--target", TARGET, "--no-progress", *extra]


# ------------------------------------------------------------- objective options
DEFAULTS = {"diversity": 1.0, "orders": 2, "reversal": 1.0, "hidden": 64, "projections": 128,
            "threshold": 0.9}  # fmt: skip
BAD_OPTIONS = [
    ("entropy", "diversity", "abc", "at least 0 (a finite number), got 'abc'"),
    ("entropy", "diversity", -0.5, "at least 0 (a finite number), got -0.5"),
    ("entropy", "diversity", math.nan, "at least 0 (a finite number), got nan"),
    ("moments", "orders", 2.5, "at least 1 (an integer), got 2.5"),
    ("moments", "orders", True, "at least 1 (an integer), got True"),
    ("adversarial", "reversal", "abc", "at least 0 (a finite number), got 'abc'"),
    ("adversarial", "hidden", 0, "at least 1 (an integer), got 0"),
    ("adversarial", "hidden", 8.0, "at least 1 (an integer), got 8.0"),
    ("sliced_wasserstein", "projections", 2.5, "at least 1 (an integer), got 2.5"),
    ("pseudo_label", "threshold", 1, "in [0, 1) (a finite number), got 1"),
]


@pytest.mark.parametrize(("objective", "option", "value", "problem"), BAD_OPTIONS)
def test_a_bad_objective_option_is_refused_before_the_run_is_read(
    tmp_path, objective, option, value, problem
):
    message = (
        f"{objective}: {option} must be {problem}: give e.g. {option}={DEFAULTS[option]}, "
        "its default"
    )
    # No run is there: the option is checked first (and no source is trained for it).
    missing = tmp_path / "nothing"
    with pytest.raises(AdaptationError, match=f"^{_literal(message)}$"):
        adapt(missing, TARGET, objective=objective, objective_options={option: value})
    with pytest.raises(AdaptationError, match=f"^{_literal(message)}$"):
        make_objective(objective, 8, 2, **{option: value})
    assert not missing.exists()


def _literal(message: str) -> str:
    return "".join("\\" + c if c in "()[].?*+^$|{}" else c for c in message)


def test_every_option_of_every_objective_has_its_type_and_range_checked():
    for name, cls in OBJECTIVES.items():
        options = list(inspect.signature(cls).parameters)[2:]
        assert sorted(cls.options) == sorted(options), name
        for option in options:
            for bad in ("abc", True, math.inf, None):
                with pytest.raises(AdaptationError, match=f"^{name}: {option} must be "):
                    make_objective(name, 8, 2, **{option: bad})
    # in range, they build; an int is a number, numpy scalars count too
    assert make_objective("entropy", 8, 2, diversity=0).diversity == 0
    assert make_objective("pseudo_label", 8, 2, threshold=0.0).threshold == 0.0
    assert make_objective("moments", 8, 2, orders=np.int64(3)).orders == 3
    assert make_objective("adversarial", 8, 2, hidden=1).discriminator[0].out_features == 1


def test_the_command_refuses_a_bad_objective_option_in_one_line(conv_run, capsys):
    before = sorted(p.name for p in conv_run.iterdir())
    args = adapt_args(conv_run, "--objective", "entropy", "--objective-arg", "diversity=abc")
    assert main(args) == 2
    assert one_line_error(capsys, "adapt").endswith(
        "entropy: diversity must be at least 0 (a finite number), got 'abc': give e.g. "
        "diversity=1.0, its default"
    )
    args = adapt_args(conv_run, "--objective", "adversarial", "--objective-arg", "hidden=0")
    assert main(args) == 2
    assert "adversarial: hidden must be at least 1 (an integer), got 0" in one_line_error(
        capsys, "adapt"
    )
    assert sorted(p.name for p in conv_run.iterdir()) == before


def test_a_config_file_s_bad_objective_option_is_refused_in_one_line(tmp_path, capsys):
    config = tmp_path / "adapt.yaml"
    config.write_text(f"target: {TARGET}\nobjective: moments\nobjective_options: {{orders: 2.5}}\n")
    assert main(["adapt", str(tmp_path / "nothing"), "--config", str(config)]) == 2
    assert one_line_error(capsys, "adapt").endswith(
        "moments: orders must be at least 1 (an integer), got 2.5: give e.g. orders=2, its default"
    )


def test_objective_options_must_be_a_mapping(tmp_path):
    with pytest.raises(AdaptationError, match="^objective_options must be a mapping"):
        adapt(tmp_path / "nothing", TARGET, objective_options=["diversity=1"])


# --------------------------------------------------------------- integer options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"curve_every": -1},
            r"curve_every must be an integer >= 0 \(0: no accuracy curve\), got -1",
        ),
        ({"curve_every": 1.5}, r"curve_every must be an integer >= 0 .*, got 1.5"),
        ({"curve_every": True}, r"curve_every must be an integer >= 0 .*, got True"),
        (
            {"curve_every": 1, "curve_sample": 0},
            r"curve_sample must be an integer >= 1 \(the test images the curve scores\), got 0",
        ),
        ({"curve_sample": -5}, r"curve_sample must be an integer >= 1 .*, got -5"),
    ],
)
def test_bad_curve_options_are_refused_before_the_run_is_read(tmp_path, options, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        adapt(tmp_path / "nothing", TARGET, **options)


# ------------------------------------------------------------ not a run directory
def test_a_saved_model_is_named_as_such_not_as_a_run_to_train(tmp_path, capsys):
    saved = tmp_path / "saved2"
    model = tiny_conv(img_size=16, num_classes=None)
    model.add_task("synth_size", 3)
    io.save_model(model, saved)
    message = (
        f"{saved} is a saved model (a model directory, as io.save_model writes), not a run "
        "directory: adapt adds the target to a run, so give the run directory that "
        "`modnet train --out` wrote (the one the model comes from)"
    )
    with pytest.raises(RunDirError, match=f"^{_literal(message)}$"):
        adapt(saved, TARGET, train_sources=True)  # training there cannot help either
    assert main(adapt_args(saved)) == 2
    assert one_line_error(capsys, "adapt").endswith(message)


def test_a_checkpoint_folder_points_to_its_run_two_levels_up(conv_run, capsys):
    checkpoint = io.latest_checkpoint(conv_run)
    message = (
        f"{checkpoint} is a checkpoint folder of the run {conv_run}, not a run directory: "
        f"adapt adds the target to a run, so give the run directory (`modnet adapt {conv_run} "
        "...`), which adapts from the run's latest checkpoint"
    )
    with pytest.raises(RunDirError, match=f"^{_literal(message)}$"):
        adapt(checkpoint, TARGET)
    assert main(adapt_args(checkpoint)) == 2
    assert one_line_error(capsys, "adapt").endswith(message)


def test_a_folder_of_other_files_is_not_a_run_and_an_empty_one_names_the_command(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(
        RunDirError,
        match=f"^{other} is not a modnet run directory \\(it holds other files\\): give the run "
        "directory that `modnet train --out` wrote$",
    ):
        adapt(other, TARGET, train_sources=True)
    nothing = tmp_path / "nothing"
    with pytest.raises(
        RunDirError,
        match=f"^{nothing} holds no trained run: train the sources first \\(`modnet train "
        f"--tasks SOURCE,SOURCE --out {nothing}`; in Python, adapt\\(\\.\\.\\., "
        "train_sources=True\\) does it\\)$",
    ):
        adapt(nothing, TARGET)


# ------------------------------------------------ a target named like a source task
def _npz(path, seed: int = 0) -> None:
    generator = np.random.default_rng(seed)
    x = generator.integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_x=x, train_y=np.arange(12) % 3, test_x=x[:6], test_y=np.arange(6) % 3)


def test_other_data_under_a_learned_task_s_name_is_told_to_rename_but_not_the_same_data(
    conv_run, tmp_path, capsys
):
    data = tmp_path / "alt" / "synth_size.npz"
    _npz(data)
    spec = f"npz:{data}"
    renamed = tmp_path / "alt" / "synth_size-target.npz"
    message = (
        f"{conv_run} already has a task 'synth_size', from synth_size, not {spec}: a file or "
        "folder task takes its file's or folder's name, so rename this one (e.g. copy it to "
        f"{renamed} and pass --target npz:{renamed})"
    )
    with pytest.raises(AdaptationError, match=f"^{_literal(message)}$"):
        adapt(conv_run, spec)
    with pytest.raises(AdaptationError, match=f"^{_literal(message)}$"):
        adapt(conv_run, spec, overwrite=True)  # --overwrite cannot replace a learned task
    assert main(["adapt", str(conv_run), "--target", spec, "--no-progress"]) == 2
    assert one_line_error(capsys, "adapt").endswith(message)
    # the same data as a task the run learned with labels keeps that message
    data = tmp_path / "d" / "digits.npz"
    _npz(data)
    run_dir = tmp_path / "npz_run"
    model = tiny_conv(img_size=16, num_classes=None)
    model.add_task("digits", 3)
    info = {"digits": {"dataset": f"npz:{data}", "phase": "train"}}
    io.save_checkpoint(run_dir, "train-step0000001", model, {"done": True}, task_info=info)
    with pytest.raises(
        AdaptationError,
        match="^the target 'digits' is a task the run learned with labels: adaptation needs a "
        "new domain; choose another --target$",
    ):
        adapt(run_dir, f"npz:{data}")
    with pytest.raises(AdaptationError, match="^the target 'synth_size' is a task the run learned"):
        adapt(conv_run, "synth_size")


# ------------------------------------------------------------ a model without BatchNorm
@pytest.fixture
def vit_run(tmp_path):
    run_dir = tmp_path / "vit"
    write_run(run_dir, tiny_vit(num_classes=None))
    return run_dir


def test_norm_on_a_vit_pool_says_to_drop_norm_from_train(vit_run, capsys):
    message = (
        "--train norm,route: this model has no BatchNorm statistics to re-estimate (e.g. a ViT "
        "with LayerNorm): drop norm from --train (--train route)"
    )
    with pytest.raises(AdaptationError, match=f"^{_literal(message)}$"):
        adapt(vit_run, TARGET, parts="route,norm")
    assert main(adapt_args(vit_run, "--train", "route,norm")) == 2
    assert one_line_error(capsys, "adapt").endswith(message)
    with pytest.raises(AdaptationError, match=_literal("(--train head,route)") + "$"):
        adapt(vit_run, TARGET, objective="entropy", parts="route,head,norm")


def test_norm_stats_on_a_vit_pool_lists_every_gradient_objective(vit_run):
    assert objective_names(uses_gradients=True) == GRADIENT_OBJECTIVES.split(", ")
    message = (
        "the 'norm_stats' objective only re-estimates BatchNorm statistics, but this model has "
        "no BatchNorm statistics to re-estimate (e.g. a ViT with LayerNorm): use a gradient "
        f"objective ({GRADIENT_OBJECTIVES}) instead"
    )
    with pytest.raises(AdaptationError, match=f"^{_literal(message)}$"):
        adapt(vit_run, TARGET, objective="norm_stats")
    model, _ = io.load_model(vit_run)
    with pytest.raises(AdaptationError, match=_literal(f"({GRADIENT_OBJECTIVES}) instead") + "$"):
        reestimate_norm_stats(model, "synth_size", None)


def test_norm_stats_with_other_parts_lists_every_gradient_objective(tmp_path):
    with pytest.raises(
        AdaptationError,
        match=_literal(f"choose a gradient objective ({GRADIENT_OBJECTIVES})") + "$",
    ):
        adapt(tmp_path / "nothing", TARGET, objective="norm_stats", parts="route,head")


def test_the_help_lists_every_registered_objective_with_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["adapt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, cls in OBJECTIVES.items():
        assert name in text
        for option, parameter in list(inspect.signature(cls).parameters.items())[2:]:
            assert f"{option}={parameter.default!r}" in text
