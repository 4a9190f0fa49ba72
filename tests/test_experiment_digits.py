"""The digits adaptation experiment's quick mode runs end to end on the synthetic suite."""

import hashlib
import json

import pytest

from experiments import digits_adaptation
from modnet import io

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)

ARGS = ["--quick", "--synthetic", "--objectives", "moments,pseudo_label"]
ARGS += ["--variants", "route,aniso+norm"]
CELLS = {
    "baseline", "norm_stats", "moments/route", "moments/aniso+norm", "pseudo_label/route",
    "pseudo_label/aniso+norm", "labels/route,head,norm", "labels/all",
}  # fmt: skip


def _digest(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_digits_adaptation_quick_synthetic_caches_cells_and_resumes(tmp_path):
    data = digits_adaptation.main([*ARGS, "--out", str(tmp_path)])
    setup = digits_adaptation.quick(digits_adaptation.SYNTHETIC)
    cells = data["cells"][0]
    assert set(cells) == CELLS
    model, _ = io.load_model(tmp_path / "pool")
    layers_templates = 6 * 4
    assert cells["norm_stats"]["trained_parameters"] == 0
    assert cells["moments/route"]["trained_parameters"] == layers_templates
    tensors = model.pool.num_tensors
    assert cells["moments/aniso+norm"]["trained_parameters"] == layers_templates * tensors
    assert (
        cells["labels/all"]["trained_parameters"]
        > cells["labels/route,head,norm"]["trained_parameters"]
    )
    baseline = cells["baseline"]
    assert baseline["nearest"] in setup.sources
    assert baseline["nearest_accuracy"] == baseline["source_only"][baseline["nearest"]]
    for start in ("nearest", "average"):
        diagnosed = baseline["diagnosis"][start]["objectives"]
        assert set(diagnosed) == set(digits_adaptation.GRADIENT_OBJECTIVES)
    curve = cells["moments/route"]["curve"]
    assert curve[0]["step"] == 0 and len(curve) >= 3
    assert [p["step"] for p in curve] == sorted({p["step"] for p in curve})
    assert cells["moments/route"]["start_route"] != cells["moments/route"]["route"]
    folder = tmp_path / setup.target
    text = (folder / "results.md").read_text()
    for line in (
        "source-only: nearest source, picked without labels",
        "source-only: the sources' average route",
        "moments: anisotropic route + norm statistics",
        "WITH target labels: full fine-tuning",
        "Why routes do not move",
    ):
        assert line in text
    assert json.loads((folder / "results.json").read_text())["cells"]["0"]["baseline"]
    assert (folder / "curves.png").is_file() and (folder / "routes.png").is_file()

    # A killed run resumes: only the missing cell runs again, on the given pool,
    # which is never written to.
    cache = digits_adaptation.Cells(tmp_path, setup.target)
    missing = cache.path(0, "moments/route")
    missing.unlink()
    kept = {n: cache.path(0, n).stat().st_mtime_ns for n in CELLS - {"moments/route"}}
    pool = tmp_path / "pool"
    before = _digest(pool)
    digits_adaptation.main([*ARGS, "--out", str(tmp_path), "--pool", str(pool)])
    assert missing.is_file()
    assert kept == {n: cache.path(0, n).stat().st_mtime_ns for n in kept}
    assert _digest(pool) == before

    # Other options on the cache, or on the pool trained here, are refused before any work.
    cached = _digest(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        digits_adaptation.main([*ARGS, "--out", str(tmp_path), "--pool", str(pool),
                                "--route-lr", "0.5"])  # fmt: skip
    assert str(stopped.value) == (
        f"error: {tmp_path / 'cells' / setup.target} was measured with route_lr=0.05, not "
        "route_lr=0.5: pass another --out, or the same options to continue"
    )
    with pytest.raises(SystemExit) as stopped:  # another target: new cells, the same pool
        digits_adaptation.main([*ARGS, "--out", str(tmp_path), "--target", "synth_shape",
                                "--train-limit", "300"])  # fmt: skip
    assert str(stopped.value) == (
        f"error: {pool} was measured with train_limit=400, not train_limit=300: pass another "
        "--out, or the same options to continue"
    )
    assert _digest(tmp_path) == cached

    with pytest.raises(SystemExit, match="was measured with route_lr=0.05, not route_lr=0.5: "):
        digits_adaptation.main([*ARGS, "--out", str(tmp_path), "--report", "--route-lr", "0.5"])
    assert _digest(tmp_path) == cached

    # The tables come back from the cache alone.
    (folder / "results.md").unlink()
    digits_adaptation.main([*ARGS, "--out", str(tmp_path), "--report"])
    assert "moments: route only" in (folder / "results.md").read_text()


def test_a_pool_without_the_sources_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds no trained run"):
        digits_adaptation.main([*ARGS, "--out", str(tmp_path), "--pool", str(tmp_path / "no")])
