"""The experiments' quick modes run end to end and their tables say what they should."""

import json
from pathlib import Path

import pytest

from experiments import multitask, reuse, transfer

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)


def test_multitask_quick(tmp_path):
    data = multitask.main(["--quick", "--out", str(tmp_path)])
    params = data["params"]
    assert params["modular"]["per_task"] < params["shared"]["per_task"] + 100
    assert params["independent"]["per_task"] > 20 * params["modular"]["per_task"]
    for method in ("modular", "independent", "shared"):
        for values in data["accuracy"][method].values():
            assert 0.0 <= values[0] <= 1.0
    analysis = data["routes"][0]
    assert len(analysis["entropy_per_layer"]) == 4
    assert all(0 <= e <= analysis["max_entropy_bits"] + 1e-6 for e in analysis["entropy_per_layer"])
    assert all(abs(analysis["similarity"][i][i] - 1.0) < 1e-6 for i in range(3))
    assert (tmp_path / "routes.png").is_file()
    assert "Claim 1" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["tasks"] == multitask.QUICK_TASKS


def test_transfer_quick(tmp_path, capsys):
    out = tmp_path / "out"
    data = transfer.main(["--quick", "--out", str(out)])
    held = data["held_out"]["synth_shape"]
    trained = {m: v["trained_parameters"] for m, v in held["methods"].items()}
    assert list(trained) == list(transfer.METHODS)
    assert trained["route"] == trained["route-uniform"] < trained["head"] < trained["route-head"]
    assert trained["route-head"] == trained["route-head-norm"] < trained["aniso-route-head"]
    assert trained["route-head-norm"] < trained["grow1"] < trained["grow2"] < trained["full"]
    assert trained["full"] == trained["scratch"]
    assert held["nearest"] == ["synth_position"]  # the plain-background source, not textured
    assert all(0.0 <= v["accuracy"][0] <= 1.0 for v in held["methods"].values())
    assert len(capsys.readouterr().out.splitlines()) >= len(transfer.METHODS)
    # A killed run continues: only the missing cells train; the pool run is only read.
    pool = out / "pools" / "loo-synth_shape"
    before = {p: p.stat().st_mtime_ns for p in pool.rglob("*")}
    for method in ("full", "scratch"):
        (out / "cells" / "synth_shape" / f"{method}-seed0.json").unlink()
    again = transfer.main(["--quick", "--out", str(out)])
    lines = [line for line in capsys.readouterr().out.splitlines() if "| seed 0 |" in line]
    assert [line.split("|")[1].strip() for line in lines] == ["full", "scratch"]
    assert {p: p.stat().st_mtime_ns for p in pool.rglob("*")} == before
    kept = {m: v for m, v in again["held_out"]["synth_shape"]["methods"].items()}
    assert kept["head"] == held["methods"]["head"]
    assert transfer.main(["--quick", "--out", str(out), "--report-only"]) == again
    text = (out / "results.md").read_text()
    assert "## Held out: `synth_shape`" in text and "pool seed 0, fixed" in text


def test_transfer_pools_are_named_by_what_they_leave_out():
    args = transfer.options(["--pools", "P", "--datasets", "mnist", "usps", "cifar10"])
    assert args.held_out == ["mnist", "usps", "cifar10"] and args.seeds == [0, 1, 2]
    assert transfer.pool_plan(args, "usps") == (Path("P/loo-usps"), ["mnist", "cifar10"])
    everything = (Path("P/pool-all"), ["mnist", "usps", "cifar10"])
    assert transfer.pool_plan(args, "mnist-colorize") == everything
    assert transfer.pool_plan(args, "npz:/data/my task.npz") == everything
    assert transfer.slug("npz:/data/my task.npz") == "npz_my_task"
    assert transfer.slug("folder:/data/pets/") == "folder_pets"


def test_reuse_quick(tmp_path):
    data = reuse.main(["--quick", "--out", str(tmp_path)])
    names = list(data["params"])
    params = [data["params"][n] for n in names]
    macs = [data["macs"][n] for n in names]
    assert max(params) - min(params) < 50  # only the route grows with depth
    # every extra layer costs one block: (L=8 - L=2) / (L=4 - L=2) = 6 / 2 blocks
    assert macs[1] < macs[2] < macs[3]
    assert (macs[3] - macs[1]) == 3 * (macs[2] - macs[1])
    assert macs[0] == macs[1]  # the plain K-block network costs what L = K costs
    again = reuse.main(["--quick", "--out", str(tmp_path)])  # finished variants are read back
    assert again["accuracy"] == data["accuracy"] and again["seconds"] == data["seconds"]
