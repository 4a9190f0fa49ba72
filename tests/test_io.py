"""Checkpoints: one pool file, one file per task, a manifest; atomic and verified."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modnet import io
from modnet.io import fs
from tests.conftest import images, moved_off_init, tiny_conv, tiny_vit


def trained_like(build=tiny_conv, route="softmax"):
    model = moved_off_init(build(tasks={"a": 3, "b": 4}, route=route)).train()
    model(images(model), "a")  # statistics move
    model.add_task("c", 5)
    model.grow(2, task="c")
    model.set_route("b", [2, 0])
    return model.eval()


@pytest.mark.parametrize(
    "build,route", [(tiny_conv, "softmax"), (tiny_vit, "hyper"), (tiny_conv, "linear")]
)
def test_model_directory_round_trips_exactly(tmp_path, build, route):
    model = trained_like(build, route)
    io.save_model(model, tmp_path / "m", task_info={"a": {"dataset": "synth_shape"}})
    files = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*"))
    assert files == [
        "manifest.json",
        "pool.safetensors",
        "tasks",
        "tasks/a.safetensors",
        "tasks/b.safetensors",
        "tasks/c.safetensors",
    ]
    loaded, manifest = io.load_model(tmp_path / "m")
    assert manifest["tasks"]["a"]["dataset"] == "synth_shape"
    x = images(model)
    with torch.no_grad():
        for task in model.task_names:
            assert torch.equal(loaded(x, task), model(x, task)), task
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_saving_the_same_model_twice_writes_the_same_bytes(tmp_path):
    model = trained_like()
    for name in "xy":
        io.save_model(model, tmp_path / name, task_info={"a": {"dataset": "synth_shape"}})
    files = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*.*"))
    assert len(files) == 5
    for file in files:  # safetensors writes metadata in hash-map order: sorted here
        assert (tmp_path / "x" / file).read_bytes() == (tmp_path / "y" / file).read_bytes(), file
    with safe_open(str(tmp_path / "x" / "tasks" / "c.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        assert metadata["task"] == "c" and metadata["num_classes"] == "5"


@pytest.mark.parametrize("build", [tiny_conv, tiny_vit])
def test_a_loaded_model_saves_the_manifest_it_was_loaded_from(tmp_path, build):
    model = trained_like(build)
    model.set_normalization("b", [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])  # no transform record
    io.save_model(model, tmp_path / "x", task_info={"a": {"dataset": "synth_shape"}})
    loaded, recorded = io.load_model(tmp_path / "x")
    io.save_model(loaded, tmp_path / "y", io.recorded_task_info(recorded, loaded.task_names))
    manifest = (tmp_path / "x" / "manifest.json").read_text()
    assert (tmp_path / "y" / "manifest.json").read_text() == manifest
    # timm's registry fields survive; the normalisation set without a transform too
    assert loaded.pretrained_cfg == model.pretrained_cfg
    assert loaded.pretrained_cfg["architecture"] == model.pretrained_cfg["architecture"]
    assert loaded.task_normalization == model.task_normalization
    # what the model derives is its own: a task without normalisation gets the family's
    only_c, _ = io.load_model(tmp_path / "x", tasks=["c", "b"])
    assert only_c.pretrained_cfg["classifier"] == "heads.c"
    assert only_c.pretrained_cfg["mean"] == build(tasks={"c": 5}).pretrained_cfg["mean"]
    assert only_c.task_normalization == {"b": {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}}
    # one name is a task, not its letters; a name given twice is loaded once
    assert io.load_model(tmp_path / "x", tasks="c")[0].task_names == ["c"]
    assert io.load_model(tmp_path / "x", tasks=["c", "a", "c"])[0].task_names == ["c", "a"]


def test_saving_never_replaces_what_modnet_did_not_write(tmp_path, monkeypatch):
    model = trained_like()
    mine = tmp_path / "mine"
    (mine / "inner").mkdir(parents=True)
    (mine / "inner" / "keep.txt").write_text("mine")
    with pytest.raises(
        io.CheckpointError, match=r"mine holds inner, which is not part of a saved model"
    ):
        io.save_model(model, mine)
    with pytest.raises(io.CheckpointError, match=r"keep.txt is a file, not a model directory"):
        io.save_model(model, mine / "inner" / "keep.txt")
    with pytest.raises(io.CheckpointError, match=r"keep.txt is a file, not a folder: choose a"):
        io.save_model(model, mine / "inner" / "keep.txt" / "m")
    monkeypatch.chdir(mine / "inner")
    for here in (".", "..", str(mine / "inner")):
        with pytest.raises(io.CheckpointError, match=r"is the current folder \(or holds it\)"):
            io.save_model(model, here)
    assert (mine / "inner" / "keep.txt").read_text() == "mine"
    # a model directory modnet wrote is replaced, but not with a file of the user's in it
    io.save_model(model, tmp_path / "m")
    io.save_model(model, tmp_path / "m")
    # (a task file the manifest does not name is the user's too, whatever its suffix)
    for extra in ("notes.md", "tasks/notes.md", "tasks/my_own.safetensors"):
        (tmp_path / "m" / extra).write_text("mine")
        with pytest.raises(io.CheckpointError) as error:
            io.save_model(model, tmp_path / "m")
        assert str(error.value) == (
            f"{tmp_path / 'm'} holds {extra}, which is not part of a saved model (saving "
            "replaces the whole folder): save the model to a new or empty folder, or move "
            "that out first"
        )
        assert (tmp_path / "m" / extra).read_text() == "mine"
        (tmp_path / "m" / extra).unlink()
    io.save_model(model, tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text("{}")  # not a modnet manifest
    with pytest.raises(io.CheckpointError, match="holds manifest.json, which is not part of"):
        io.save_model(model, tmp_path / "m")


def test_loading_a_subset_of_tasks(tmp_path):
    model = trained_like()
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m", tasks=["c"])
    assert loaded.task_names == ["c"]
    x = images(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x, "c"))
    with pytest.raises(io.CheckpointError, match="no task 'zzz'"):
        io.load_model(tmp_path / "m", tasks=["zzz"])


def test_task_files_are_small_next_to_the_pool(tmp_path):
    import timm

    model = timm.create_model("modnet_conv_tiny", tasks={"a": 10})
    io.save_model(model, tmp_path / "m")
    pool = (tmp_path / "m" / "pool.safetensors").stat().st_size
    task = (tmp_path / "m" / "tasks" / "a.safetensors").stat().st_size
    # route (16 x 4), head (40 x 10) and 16 layers of BatchNorm statistics
    assert task < 0.25 * pool


def test_corrupted_and_mismatched_checkpoints_raise_clear_errors(tmp_path):
    model = trained_like()
    io.save_model(model, tmp_path / "m")
    task_file = tmp_path / "m" / "tasks" / "b.safetensors"
    task_file.write_bytes(task_file.read_bytes()[:50])
    with pytest.raises(io.CheckpointError, match="tasks/b.safetensors is corrupted"):
        io.load_model(tmp_path / "m")
    io.save_model(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["tasks"]["a"]["num_classes"] = 7
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "m" / "tasks" / "a.safetensors"
    with pytest.raises(io.CheckpointError) as caught:
        io.load_model(tmp_path / "m")
    assert str(caught.value) == (
        f"checkpoint file {path} does not match the model manifest.json describes: "
        "heads.a.bias has shape [3], the model's is [7]; heads.a.weight has shape [3, 8], "
        "the model's is [7, 8]; restore the checkpoint or write it again"
    )
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(io.CheckpointError, match="corrupted"):
        io.load_model(tmp_path / "m")
    with pytest.raises(io.CheckpointError, match="nothing does not exist: give a run directory"):
        io.load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.CheckpointError, match="empty holds no modnet checkpoint"):
        io.load_model(tmp_path / "empty")


def two_runs(tmp_path):
    """Two runs of the same model (same config, tasks and routes), trained apart."""
    first = moved_off_init(tiny_conv(tasks={"a": 3, "b": 4}), scale=0.2).eval()
    second = moved_off_init(tiny_conv(tasks={"a": 3, "b": 4}), scale=0.3).eval()
    io.save_model(first, tmp_path / "first")
    io.save_model(second, tmp_path / "second")
    return first, second


def logits(model, x):
    with torch.no_grad():
        return {task: model(x, task) for task in model.task_names}


@pytest.mark.parametrize("file", ["pool.safetensors", "tasks/b.safetensors"])
def test_a_file_from_another_run_of_the_same_model_is_refused(tmp_path, file):
    first, second = two_runs(tmp_path)
    ours, theirs = io.pool_fingerprint(first)[:12], io.pool_fingerprint(second)[:12]
    mixed = tmp_path / "mixed"
    shutil.copytree(tmp_path / "first", mixed)
    shutil.copyfile(tmp_path / "second" / file, mixed / file)
    if file == "pool.safetensors":
        expected = (
            f"pool file {mixed / file} was written by another run (pool fingerprint {theirs}, "
            f"its manifest records {ours}): restore this checkpoint's own pool.safetensors "
            "(task files only work with the pool they were trained with)"
        )
    else:
        expected = (
            f"task file {mixed / file} was written by another run (pool fingerprint {theirs}, "
            f"this checkpoint's is {ours}): restore this checkpoint's own tasks/b.safetensors, "
            "or add the task to a model with its own run's pool with modnet.io.import_task"
        )
    for tasks in (None, ["b"] if file.startswith("tasks") else ["a"]):
        with pytest.raises(io.CheckpointError, match=f"^{re.escape(expected)}$"):
            io.load_model(mixed, tasks=tasks)
    # the untouched checkpoint, and the mixed one once its own file is back, load exactly
    x = images(first)
    for directory in (tmp_path / "first", mixed):
        shutil.copyfile(tmp_path / "first" / file, mixed / file)
        loaded, _ = io.load_model(directory)
        got, want = logits(loaded, x), logits(first, x)
        assert all(torch.equal(got[task], want[task]) for task in want)


def test_a_task_file_of_a_run_with_the_same_pool_loads(tmp_path):
    first = moved_off_init(tiny_conv(tasks={"a": 3, "b": 4})).eval()
    io.save_model(first, tmp_path / "first")
    with torch.no_grad():
        first.heads["b"].weight.mul_(2)  # the same pool, task b trained further
    io.save_model(first, tmp_path / "second")
    shutil.copyfile(tmp_path / "second/tasks/b.safetensors", tmp_path / "first/tasks/b.safetensors")
    loaded, _ = io.load_model(tmp_path / "first")
    x = images(first)
    with torch.no_grad():
        assert torch.equal(loaded(x, "b"), first(x, "b"))


def test_tensors_of_another_task_are_refused_in_one_line(tmp_path):
    model = trained_like()
    io.save_model(model, tmp_path / "m")
    path = tmp_path / "m" / "tasks" / "b.safetensors"
    shutil.copyfile(tmp_path / "m" / "tasks" / "a.safetensors", path)
    with pytest.raises(io.CheckpointError) as caught:
        io.load_model(tmp_path / "m")
    assert str(caught.value) == (
        f"checkpoint file {path} does not match the model manifest.json describes: "
        "missing ['heads.b.bias', 'heads.b.weight', "
        "'norm_stats.b.layers__bn1__num_batches_tracked'], unexpected ['heads.a.bias', "
        "'heads.a.weight', 'norm_stats.a.layers__bn1__num_batches_tracked']; restore the "
        "checkpoint or write it again"
    )


def test_a_checkpoint_written_before_fingerprints_loads_as_before(tmp_path):
    model = trained_like()
    io.save_model(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    del manifest["pool_fingerprint"]
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    for path in (tmp_path / "m").rglob("*.safetensors"):
        save_file(load_file(path), path)  # no metadata, as modnet wrote them then
    loaded, _ = io.load_model(tmp_path / "m")
    got, want = logits(loaded, images(model)), logits(model, images(model))
    assert all(torch.equal(got[task], want[task]) for task in want)
    # a file without a fingerprint in a checkpoint that records one is refused
    io.save_model(model, tmp_path / "new")
    shutil.copyfile(tmp_path / "m/tasks/c.safetensors", tmp_path / "new/tasks/c.safetensors")
    with pytest.raises(
        io.CheckpointError,
        match=r"^task file .*c\.safetensors was written by "
        r"another run \(pool fingerprint none, ",
    ):
        io.load_model(tmp_path / "new")


def test_checkpoints_update_latest_only_when_complete_and_prune_old_ones(tmp_path):
    model = trained_like()
    for step in (1, 2, 3):
        io.save_checkpoint(tmp_path, f"train-step{step:07d}", model, {"step": step})
    assert io.latest_checkpoint(tmp_path).name == "train-step0000003"
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["train-step0000002", "train-step0000003"]
    assert io.load_trainer_state(io.latest_checkpoint(tmp_path))["step"] == 3
    # a half-written checkpoint (a crash before the rename) is invisible
    (tmp_path / "checkpoints" / ".train-step0000004.tmp-99").mkdir()
    assert io.latest_checkpoint(tmp_path).name == "train-step0000003"
    loaded, _ = io.load_model(tmp_path)
    assert loaded.task_names == model.task_names


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    io.atomic_write_text(target, "old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_import_task_refuses_foreign_tensors_in_one_line(tmp_path):
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 4})).eval()
    io.save_model(model, tmp_path / "m")
    path = tmp_path / "m" / "tasks" / "b.safetensors"
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    tensors["pool.extra"] = torch.zeros(1)  # a tensor that belongs to no task
    save_file(tensors, path, metadata=metadata)
    target, _ = io.load_model(tmp_path / "m", tasks=["a"])
    with pytest.raises(io.CheckpointError) as caught:
        io.import_task(target, path)
    assert str(caught.value) == (
        f"task file {path} does not hold the tensors of a task of this model: "
        "missing [], unexpected ['pool.extra']"
    )
    assert target.task_names == ["a"]


def test_import_task_into_a_model_of_another_dtype_names_the_dtypes(tmp_path):
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 4})).eval()
    io.save_model(model, tmp_path / "m")
    path = tmp_path / "m" / "tasks" / "b.safetensors"
    target, _ = io.load_model(tmp_path / "m", tasks=["a"])
    target.to(torch.bfloat16)
    with pytest.raises(io.CheckpointError) as caught:
        io.import_task(target, path)
    assert str(caught.value) == (
        f"task file {path} holds float32 tensors but this model is bfloat16: import the "
        "task into the model in the dtype it was saved in, then convert the model "
        "(model.to(dtype))"
    )
    assert target.task_names == ["a"]
    # done as the message says, the task arrives and agrees with the saved model's
    target, _ = io.load_model(tmp_path / "m", tasks=["a"])
    assert io.import_task(target, path) == "b"
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    expected = model.to(torch.bfloat16)(x, task="b")
    torch.testing.assert_close(target.to(torch.bfloat16)(x, task="b"), expected, rtol=0, atol=0)


def test_every_file_written_follows_the_umask_safetensors_included(tmp_path, monkeypatch):
    # A umask of 022 whatever the caller's: under 077 every file would be 0600, which
    # is what safetensors writes anyway, and the test could not fail.
    previous = os.umask(0o022)
    monkeypatch.setattr(fs, "FILE_MODE", 0o644)  # what importing under 022 records
    try:
        directory = io.save_model(tiny_conv(tasks={"a": 3}), tmp_path / "model")
    finally:
        os.umask(previous)
    files = [p for p in Path(directory).rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}


def test_the_phase_of_a_task_comes_from_the_manifest_or_for_older_runs_from_results(tmp_path):
    manifest = {"tasks": {"a": {"phase": "transfer-a"}, "b": {}, "c": {"adapted_from": ["b"]}}}
    manifest["tasks"]["d"] = {}
    io.record_results(tmp_path, "train", {"accuracy": {"b": 0.9}})
    phases = [io.task_phase(tmp_path, manifest, name) for name in "abcd"]
    assert phases == ["transfer-a", "train", "adapt-c", "transfer-d"]


def test_partly_trained_tasks_are_the_unfinished_phases_or_all_once_the_pool_moved(tmp_path):
    template = torch.arange(6.0)

    def checkpoint(name, sequence, phase, done, fingerprint, pool):
        tasks = {"a": {"phase": "train"}, "b": {"phase": "train"}}
        if phase != "train":
            tasks["c"] = {"phase": phase}
        manifest = dict(format=io.FORMAT, tasks=tasks, pool_fingerprint=fingerprint)
        record = dict(sequence=sequence, phase=phase, done=done, trainer_state=False)
        manifest["checkpoint"] = record
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "manifest.json").write_text(json.dumps(manifest))
        save_file(pool, tmp_path / "checkpoints" / name / "pool.safetensors")
        return manifest

    finished = checkpoint("train-step0000004", 1, "train", True, "p0", {"t0": template})
    assert io.partly_trained(tmp_path, finished) is None
    new_task = checkpoint("transfer-c-step0000002", 2, "transfer-c", False, "p0", {"t0": template})
    said = io.partly_trained(tmp_path, new_task)
    assert said.startswith(f"the phase 'transfer-c' of {tmp_path} is unfinished, so c is partly")
    assert io.partly_trained(tmp_path, new_task, ["a", "b"]) is None  # the pool did not move
    # a template added (--grow) changes the fingerprint but leaves a and b as they were
    grown = {"t0": template, "t1": torch.ones(6)}
    added = checkpoint("transfer-c-step0000003", 3, "transfer-c", False, "p1", grown)
    assert io.partly_trained(tmp_path, added).endswith(
        "so c is partly trained: run its "
        f"command again to finish it, or `modnet "
        f"discard {tmp_path}`"
    )
    assert io.partly_trained(tmp_path, added, ["a", "b"]) is None
    # a shared value that moved by one ulp changes every task
    moved = {"t0": torch.nextafter(template, template + 1), "t1": torch.ones(6)}
    shared = checkpoint("transfer-c-step0000004", 4, "transfer-c", False, "p2", moved)
    assert ", so a, b, c are partly trained" in io.partly_trained(tmp_path, shared)
    checkpoint_dir = tmp_path / "checkpoints" / "transfer-c-step0000004"  # also from inside
    assert ", so a is partly trained" in io.partly_trained(checkpoint_dir, shared, ["a"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_saved_in_another_dtype_loads_in_it_and_its_tasks_import(tmp_path, dtype):
    model = moved_off_init(tiny_conv(tasks={"a": 3, "b": 2})).to(dtype).eval()
    io.save_model(model, tmp_path / "m")
    loaded, _ = io.load_model(tmp_path / "m", tasks=["a"])
    assert {p.dtype for p in loaded.parameters()} == {dtype}  # before the fix: float32
    io.import_task(loaded, tmp_path / "m" / "tasks" / "b.safetensors")  # same fingerprint
    x = images(model, 2).to(dtype)
    assert torch.equal(loaded(x, task="b"), model(x, task="b"))
    from modnet.cli import main  # modnet eval feeds it inputs in its dtype

    argv = ["eval", str(tmp_path / "m"), "--task", "a", "--data", "a=synth_size"]
    assert main([*argv, "--test-limit", "8"]) == 0


def test_a_model_saved_with_frozen_batchnorms_loads_with_the_same_logits(tmp_path):
    # timm.utils.model.freeze turns BatchNorms into FrozenBatchNorm2d, which has no
    # num_batches_tracked: the file lacks the counters, which load as a fresh model's
    from timm.utils.model import freeze

    model = moved_off_init(tiny_conv(tasks={"a": 3})).eval()
    with torch.no_grad():
        for name, value in model.trunk.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                value.uniform_(0.5, 1.5)  # statistics as training leaves them
    x = images(model, 2)
    with torch.no_grad():
        expected = model(x, "a")
    freeze(model)
    assert "FrozenBatchNormAct2d" in {type(m).__name__ for m in model.modules()}
    io.save_model(model, tmp_path / "m")
    assert not any(
        "num_batches_tracked" in k for k in load_file(tmp_path / "m" / "pool.safetensors")
    )
    loaded, _ = io.load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x, "a"), expected)
    counts = {k: v for k, v in loaded.state_dict().items() if k.endswith("num_batches_tracked")}
    assert {"trunk.stem.1.num_batches_tracked", "trunk.final_norm.num_batches_tracked"} <= set(
        counts
    )
    assert all(int(counts[k]) == 0 for k in counts if k.startswith("trunk."))
