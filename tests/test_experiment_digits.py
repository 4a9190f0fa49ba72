"""The digits adaptation experiment's quick mode runs end to end on the synthetic suite."""

import json

import pytest

from experiments import digits_adaptation

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)


def test_digits_adaptation_quick_synthetic(tmp_path):
    data = digits_adaptation.main(["--quick", "--synthetic", "--out", str(tmp_path)])
    setup = digits_adaptation.quick(digits_adaptation.SYNTHETIC)
    (record,) = data["seeds"]
    assert set(record["objectives"]) == set(setup.objectives)
    assert set(record["source_only"]) == set(setup.sources)
    for objective, run in record["objectives"].items():
        assert 0.0 <= run["accuracy"] <= 1.0
        expected = 0 if objective == "norm_stats" else 6 * 4  # layers x templates
        assert run["trained_parameters"] == expected
        assert set(run["relation"]) == {*setup.sources, "average", "start"}
    text = (tmp_path / "results.md").read_text()
    for line in ("source-only: the sources' average", "adapted: moments", "Wall time"):
        assert line in text
    assert json.loads((tmp_path / "results.json").read_text())["seeds"][0]["start"] > 0
    assert (tmp_path / "routes.png").is_file()
