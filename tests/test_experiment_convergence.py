"""The plateau test of experiments/convergence.py, on known curves and on a real tiny run."""

import json

import pytest

from experiments import convergence


def test_the_gain_is_measured_from_the_last_evaluation_before_the_last_fifth():
    points = [(1.0, 0.5), (2.0, 0.8), (3.0, 0.9), (4.0, 0.95), (5.0, 0.952)]
    stats = convergence.plateau(points, 5.0)
    assert stats["gain_last_fifth"] == pytest.approx(0.2)  # 95.2 - 95.0, from epoch 4
    assert stats["final"] == 0.952 and stats["best"] == 0.952
    rising = convergence.plateau([(1.0, 0.5), (2.0, 0.6), (3.0, 0.7)], 3.0)
    assert rising["gain_last_fifth"] == pytest.approx(10.0)  # from epoch 2: still learning


@pytest.mark.slow
def test_quick_run_reports_every_task_and_draws_the_curves(tmp_path):
    data = convergence.main(["--quick", "--out", str(tmp_path)])
    (run,) = data["plateau"].values()
    assert len(run) >= 2 and all(s["evaluations"] == 5 for s in run.values())
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["plateau"] == json.loads(json.dumps(data["plateau"]))
