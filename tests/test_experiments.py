"""The experiments' quick modes run end to end and their tables say what they should."""

import json

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


def test_transfer_quick(tmp_path):
    data = transfer.main(["--quick", "--out", str(tmp_path)])
    trained = data["trained_parameters"]
    assert trained["route only"] < trained["head only (linear probe)"] < trained["route + head"]
    assert trained["route + head"] == trained["route + head + norm"]
    assert trained["route + head"] < trained["route + head + norm, grow 2"]
    assert trained["route + head + norm, grow 2"] < trained["full fine-tuning"]
    assert all(0.0 <= a[0] <= 1.0 for a in data["accuracy"].values())


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
