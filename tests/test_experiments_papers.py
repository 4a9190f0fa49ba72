"""Quick modes of the three papers' experiments run end to end and write their tables."""

import json

import pytest

from experiments import atlas, hypernet_teacher, second_order


@pytest.mark.slow
def test_hypernet_teacher_quick(tmp_path):
    data = hypernet_teacher.main(["--quick", "--out", str(tmp_path)])
    results = data["results"]
    assert set(results) == set(hypernet_teacher.SUPPORTS)
    for by_student in results.values():
        modular, plain = by_student["modular"][0], by_student["non-modular"][0]
        # the baseline is the modular student's size, within one hidden unit
        assert abs(modular["parameters"] - plain["parameters"]) < hypernet_teacher.IN + 16
        for run in (modular, plain):
            assert run["in_support"] > 0 and run["out_of_support"] > 0
            assert run["ratio"] == pytest.approx(run["out_of_support"] / run["in_support"])
            assert run["r2"] <= 1.0 and run["r2_ood"] <= 1.0
    assert results["connected"]["modular"][0]["connected"]
    assert not results["disconnected"]["modular"][0]["connected"]
    text = (tmp_path / "results.md").read_text()
    assert "out-of-support MSE" in text and "hypernet_teacher.py --quick" in text


def test_support_pairs_follow_their_definitions():
    import random

    ring = hypernet_teacher.support_pairs("connected", random.Random(0))
    split = hypernet_teacher.support_pairs("disconnected", random.Random(0))
    sampled = hypernet_teacher.support_pairs("random", random.Random(3))
    modules = set(range(hypernet_teacher.MODULES))
    for pairs in (ring, split, sampled):
        assert len(pairs) == hypernet_teacher.MODULES
        assert all(a < b for a, b in pairs)  # as itertools.combinations writes them
        assert {m for pair in pairs for m in pair} == modules  # every module is trained
    assert hypernet_teacher.is_connected(ring) and not hypernet_teacher.is_connected(split)
    assert all((a < 3) == (b < 3) for a, b in split)  # never across the two groups


@pytest.mark.slow
def test_atlas_quick(tmp_path):
    data = atlas.main(["--quick", "--out", str(tmp_path)])
    shots = str(atlas.QUICK_SHOTS[0])
    assert set(data["few_shot"][shots]) == set(atlas.FEW_SHOT_METHODS)
    for values in data["few_shot"][shots].values():
        assert 0.0 <= values[0] <= 1.0
    assert "learned anisotropic" in data["addition"]
    assert set(data["addition"]["uniform 1/K"]) == set(atlas.QUICK_DATA["vectors"])
    text = (tmp_path / "results.md").read_text()
    assert "Few-shot learning" in text and "Task addition" in text


@pytest.mark.slow
def test_second_order_quick(tmp_path):
    data = second_order.main(["--quick", "--out", str(tmp_path)])
    result = data["runs"][0]["result"]
    assert set(result) == set(second_order.METHODS)
    tasks = second_order.QUICK_DATA["tasks"]
    for method in result.values():
        for kind in ("individual", "composed", "unlearned", "specialised"):
            assert set(method[kind]) == set(tasks)
            assert all(0.0 <= a <= 1.0 for a in method[kind].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["names"]["tasks"] == tasks
    assert "module removed" in (tmp_path / "results.md").read_text()
