"""The experiment scripts' options: defaults shown once, budgets resolved in order."""

import json
from pathlib import Path

import pytest

from experiments import convergence, digits_adaptation, transfer


@pytest.mark.parametrize("module", [transfer, convergence, digits_adaptation])
def test_experiment_help_shows_each_default_once(module, capsys):
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: runs/experiments/{module.__name__.rpartition('.')[2]})" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "--seeds" not in text or "(default: 0 1 2)" in text  # a list as it is typed
    assert "MODNET_DATA_ROOT) (default:" not in text  # a default the help names is not repeated


@pytest.mark.parametrize(
    "module, prefix", [(transfer, "--epoch"), (convergence, "--crit"), (digits_adaptation, "--ou")]
)
def test_experiments_take_no_abbreviated_option(module, prefix, capsys):
    # an abbreviation would bind to whichever option it prefixes, silently
    with pytest.raises(SystemExit) as stopped:
        module.main([prefix, "1"])
    assert stopped.value.code == 2
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_the_transfer_budget_is_a_flag_else_the_transfer_config_else_the_default(tmp_path):
    config = tmp_path / "transfer.yaml"
    config.write_text("epochs: 5\ntrain_limit: 100\nhead_lr: 0.01\n")
    args = transfer.options(["--transfer-config", str(config)])
    assert (args.epochs, args.train_limit, args.test_limit) == (5, 100, 2000)
    values = transfer.transfer_values(args, {"epochs": 12, "lr": 0.1})
    assert (values["epochs"], values["train_limit"], values["head_lr"]) == (5, 100, 0.01)
    args = transfer.options(["--transfer-config", str(config), "--epochs", "2"])
    assert transfer.transfer_values(args, {"epochs": 12})["epochs"] == 2
    assert transfer.options([]).epochs == 3
    # the README's command reads the committed budget
    committed_yaml = Path(__file__).parents[1] / "experiments" / "configs" / "transfer.yaml"
    committed = transfer.options(["--transfer-config", str(committed_yaml)])
    assert (committed.epochs, committed.train_limit, committed.test_limit) == (3, 2000, 2000)


def test_a_cached_transfer_cell_of_another_budget_is_refused(tmp_path):
    cell = tmp_path / "head-seed0.json"
    cell.write_text(json.dumps({"budget": {"epochs": 1, "train_limit": 128}, "accuracy": 0.5}))
    same = transfer.options(["--quick"])  # 1 epoch, 128 training and 64 test images
    assert transfer.cached_cell(cell, same)["accuracy"] == 0.5  # no test_limit recorded: the rest
    more = transfer.options(["--quick", "--epochs", "2"])
    with pytest.raises(SystemExit, match=r"measured with epochs=1, not epochs=2: pass another"):
        transfer.cached_cell(cell, more)
    cells = [{"budget": {"epochs": 1, "train_limit": 128, "test_limit": 64}}]
    assert transfer.budget_text(cells) == "1 epoch, 128 training images, 64 test images"


def test_route_analysis_runs_on_its_own(tmp_path, capsys):
    from experiments import route_analysis
    from modnet import io
    from tests.conftest import tiny_conv

    model = tiny_conv(tasks={"a": 3, "b": 3})
    model.set_route("b", model.routes["a"].plan(None).coefficients.detach().clone())
    io.save_model(model, tmp_path / "model")
    assert route_analysis.main([str(tmp_path / "model")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Route entropy per layer (bits, mean over tasks;")
    assert "| a | 1.00 | 1.00 |" in text  # b was given a's route: identical
    with pytest.raises(SystemExit) as stopped:
        route_analysis.main([str(tmp_path / "nothing")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_transfer_report_only_refuses_options_that_would_not_apply(tmp_path, capsys):
    # results.md records the command: a budget flag there would misstate the cells' budget
    with pytest.raises(SystemExit) as stopped:
        transfer.options(["--report-only", "--epochs", "5", "--methods", "route"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith("--epochs, --methods would not apply: leave them out")
    (tmp_path / "cells" / "mnist").mkdir(parents=True)
    (tmp_path / "cells" / "mnist" / "route-seed0.json").write_text("{}")
    args = transfer.options(["--report-only", "--quick", "--out", str(tmp_path)])
    assert args.report_only and args.out == str(tmp_path)


def test_an_out_folder_holding_someone_elses_results_is_refused_before_any_work(tmp_path, capsys):
    from experiments import hypernet_teacher

    (tmp_path / "results.md").write_text("my paper's numbers")
    with pytest.raises(SystemExit) as stopped:
        hypernet_teacher.main(["--quick", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith(f"--out {tmp_path} holds a results.md that hypernet_teacher.py did not "
                        "write: choose another --out")  # fmt: skip
    assert (tmp_path / "results.md").read_text() == "my paper's numbers"
    # nor another experiment's results; its own are replaced when it runs again
    for command, refused in (("multitask.py --quick", True), ("hypernet_teacher.py", False)):
        record = {"command": f"python experiments/{command}"}
        (tmp_path / "results.json").write_text(json.dumps(record))
        if refused:
            with pytest.raises(SystemExit):
                hypernet_teacher.options(["--out", str(tmp_path)])
        else:
            assert hypernet_teacher.options(["--out", str(tmp_path)]).out == str(tmp_path)


def test_transfer_report_only_needs_measured_cells(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        transfer.options(["--report-only", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert "--report-only found no measured cells under --out" in capsys.readouterr().err
    assert not (tmp_path / "results.md").exists()


def test_options_an_experiment_does_not_use_are_not_offered(capsys):
    from experiments import hypernet_teacher

    with pytest.raises(SystemExit):
        hypernet_teacher.main(["--help"])
    text = capsys.readouterr().out
    assert "--outer-steps" in text and "--data-root" not in text and "--epochs" not in text


def _files(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_reuse_refuses_other_options_on_its_cells_and_reuses_them_with_the_same(tmp_path):
    from experiments import reuse

    out = tmp_path / "reuse"
    quick = ["--quick", "--epochs", "1", "--train-limit", "64", "--out", str(out)]
    first = reuse.main(quick)
    before = _files(out)
    # another budget into the same --out: refused before any work, the first results kept
    with pytest.raises(SystemExit) as stopped:
        reuse.main([*quick, "--train-limit", "32"])
    assert str(stopped.value) == (
        f"error: {out} was measured with train_limit=64, not train_limit=32: pass another "
        "--out, or the same options to continue"
    )
    full = r"measured with tasks=\['synth_shape'\], train_limit=64, .* not tasks=\['cifar10'\], "
    with pytest.raises(SystemExit, match=full):
        reuse.main(["--epochs", "1", "--out", str(out)])  # a full run on quick cells
    assert _files(out) == before
    assert (
        "Command: `python experiments/reuse.py --quick --epochs 1 --train-limit 64 --out"
        in (out / "results.md").read_text()
    )
    # the same options read the finished cells back: nothing retrains
    again = reuse.main(quick)
    assert again["accuracy"] == first["accuracy"] and again["seconds"] == first["seconds"]
    cells = {p: b for p, b in before.items() if "seed0" in p.parts}
    assert cells and {p: b for p, b in _files(out).items() if "seed0" in p.parts} == cells
    # cells made before their options were recorded are not trusted either
    (out / "options.json").unlink()
    with pytest.raises(SystemExit, match="do not record the options they were measured with"):
        reuse.main(quick)


def test_transfer_refuses_cached_cells_and_nearest_sources_of_another_budget_before_any_pool(
    tmp_path,
):
    nearest = tmp_path / "nearest" / "synth_shape" / "seed0.json"
    nearest.parent.mkdir(parents=True)
    budget = {"epochs": 1, "train_limit": 256, "test_limit": 64}  # --quick reads 128
    nearest.write_text(json.dumps({"nearest": "synth_position", "budget": budget}))
    with pytest.raises(SystemExit) as stopped:
        transfer.main(["--quick", "--out", str(tmp_path)])
    assert str(stopped.value) == (
        f"error: {nearest} was measured with train_limit=256, not train_limit=128: pass "
        "another --out, or the same options to continue"
    )
    assert not (tmp_path / "pools").exists()  # refused before any pool trained
    args = transfer.options(["--quick", "--train-limit", "256", "--out", str(tmp_path)])
    transfer.check_cached(args)  # its own budget: read back
    cell = transfer.cell_path(tmp_path, "synth_shape", "head", 0)
    cell.parent.mkdir(parents=True)
    cell.write_text(json.dumps({"budget": {**budget, "epochs": 2}}))
    with pytest.raises(SystemExit, match=f"{cell} was measured with epochs=2, not epochs=1: "):
        transfer.check_cached(args)


def test_transfer_refuses_other_pool_or_transfer_options_on_its_cells_and_reuses_them_with_the_same(
    tmp_path,
):
    import yaml

    out = tmp_path / "tr"
    quick = ["--quick", "--out", str(out), "--methods", "head"]
    first = transfer.main(quick)
    before = _files(out / "cells") | _files(out / "nearest") | _files(out / "pools")
    recorded = json.loads((out / "options.json").read_text())
    assert "seed" not in recorded and recorded["pool.epochs"] == 1  # another --seeds: reused
    pool_config = tmp_path / "pool.yaml"
    pool_config.write_text(yaml.safe_dump({**transfer.QUICK_POOL, "epochs": 3, "lr": 0.001}))
    transfer_config = tmp_path / "transfer.yaml"
    transfer_config.write_text("head_lr: 0.05\n")
    refused = {  # each refused in one line before any work: the cells' pool would differ
        "--pool-config": (pool_config, "lr=0.01, pool.epochs=1, pool.lr=0.01, not lr=0.001, "
                                       "pool.epochs=3, pool.lr=0.001"),
        "--transfer-config": (transfer_config, "head_lr=None, not head_lr=0.05"),
        "--pools": (tmp_path / "pools", f"pools=pools, not pools={tmp_path / 'pools'}"),
    }  # fmt: skip
    for flag, (value, differs) in refused.items():
        with pytest.raises(SystemExit) as stopped:
            transfer.main([*quick, flag, str(value)])
        assert str(stopped.value) == (
            f"error: {out} was measured with {differs}: pass another --out, or the same "
            "options to continue"
        )
    assert not (tmp_path / "pools").exists()
    many = {**transfer.QUICK_POOL, "epochs": 3, "lr": 0.001, "route_lr": 0.1, "batch_size": 16}
    pool_config.write_text(yaml.safe_dump(many))
    with pytest.raises(SystemExit) as stopped:  # the first few named, the rest counted
        transfer.main([*quick, "--pool-config", str(pool_config)])
    assert str(stopped.value) == (
        f"error: {out} was measured with batch_size=32, lr=0.01, route_lr=0.05, not "
        "batch_size=16, lr=0.001, route_lr=0.1 (4 more options differ): pass another --out, "
        "or the same options to continue"
    )
    after = _files(out / "cells") | _files(out / "nearest") | _files(out / "pools")
    assert after == before
    # the same options read the cells back: nothing retrains
    assert transfer.main(quick)["held_out"] == first["held_out"]
    assert _files(out / "cells") | _files(out / "nearest") | _files(out / "pools") == before
    # cells made before their options were recorded are not trusted
    (out / "options.json").unlink()
    with pytest.raises(SystemExit, match="do not record the options they were measured with"):
        transfer.main(quick)
