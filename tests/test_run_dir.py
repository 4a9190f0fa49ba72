"""Run directories: modnet touches only what it wrote, recovers what a crash left, and
never lets one phase overtake another or resume with other options."""

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from modnet import io
from modnet.cli import main
from modnet.errors import CheckpointError, RunDirError
from modnet.plot import read_metrics
from modnet.train import api as train_api
from modnet.train.loop import Trainer
from tests.conftest import images, moved_off_init, tiny_conv

TINY = [
    *("--model-arg", "depth=3", "--model-arg", "width=8", "--model-arg", "exp_ratio=2.0"),
    *("--model-arg", "img_size=8", "--model-arg", "num_templates=2"),
]
FAST = [
    *("--train-limit", "64", "--test-limit", "32", "--batch-size", "32", "--epochs", "1"),
    "--no-progress",
]
TRAIN = ["train", "--tasks", "synth_color,synth_size", *TINY, *FAST]


def train_args(out: Path, *extra: str) -> list[str]:
    return [*TRAIN, "--out", str(out), *extra]


def transfer_args(out: Path, task: str = "synth_shape", *extra: str) -> list[str]:
    return ["transfer", str(out), "--task", task, *FAST, *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-task run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_args(out)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


class Interrupt(BaseException):
    """Stands for a kill: raised from inside the training loop."""


@pytest.fixture
def interrupt_after_first_checkpoint(monkeypatch):
    """The next training phase stops right after its first checkpoint, unfinished."""
    original = Trainer.checkpoint

    def checkpoint_then_stop(self, done):
        original(self, done)
        if not done:
            monkeypatch.setattr(Trainer, "checkpoint", original)
            raise Interrupt

    monkeypatch.setattr(Trainer, "checkpoint", checkpoint_then_stop)


def file_bytes(checkpoint: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(checkpoint)): p.read_bytes()
        for p in sorted(checkpoint.rglob("*.safetensors"))
    }


# ------------------------------------------------------------------ 1. --overwrite
@pytest.mark.parametrize(
    "files",
    [
        {"important.txt": "x", "photos/a.txt": "y"},
        # a file named LATEST (and other names a run has) does not make a folder a run;
        # it once did, and --overwrite replaced these
        {"LATEST": "v2.1", "config.yaml": "my: config", "metrics.jsonl": "my log"},
        {"LATEST": "v2.1", "checkpoints/mine/notes.txt": "z"},
    ],
    ids=["files", "LATEST", "checkpoints"],
)
def test_overwrite_refuses_a_folder_modnet_did_not_write(tmp_path, capsys, files):
    folder = tmp_path / "d"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for extra in ((), ("--overwrite",)):
        assert main(train_args(folder, *extra)) == 2
        err = capsys.readouterr().err
        assert "not a modnet run directory" in err and "choose another --out" in err
    held = {str(p.relative_to(folder)): p.read_text() for p in folder.rglob("*") if p.is_file()}
    assert held == files  # nothing changed, nothing added (no marker, no lock)


def test_overwrite_replaces_a_damaged_run_and_only_what_modnet_wrote(run_copy, capsys):
    (run_copy / "notes.txt").write_text("mine")
    (run_copy / "checkpoints" / "mine").mkdir()
    (run_copy / "LATEST").write_bytes(b"\x00\xff garbage")
    (run_copy / "results.json").write_text("{not json")
    for state in run_copy.glob("checkpoints/*/trainer_state.pt"):
        state.write_bytes(b"damaged")
    assert main(train_args(run_copy, "--overwrite")) == 0
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert (run_copy / "checkpoints" / "mine").is_dir()
    state = io.load_trainer_state(io.latest_checkpoint(run_copy))
    assert state["done"] and state["step"] == state["total_steps"]
    assert set(json.loads((run_copy / "results.json").read_text())) == {"train"}


def test_clearing_a_run_removes_modnet_files_only_even_in_its_folders(tmp_path):
    from modnet.io.run import clear_run

    run = tmp_path / "run"
    modnet_files = [
        "LATEST", "results.json", "metrics.jsonl", "routes.png", "curves.png",
        "transfer-b-routes.png", "export/a.pt2", "export/a/model.safetensors",
        "export/a/config.json", "tensorboard/train/events.out.tfevents.1.host.2.0",
    ]  # fmt: skip
    users = [
        "export/notes.txt", "export/a/README.md", "tensorboard/train/mine.csv",
        "config-sweep.yaml", "notes.txt",
    ]  # fmt: skip
    for name in modnet_files + users:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    (run / "config.yaml").write_text("# modnet train: the resolved options of this run.\n")
    (run / "config-transfer-b.yaml").write_text("# modnet transfer: the resolved options\n")
    (run / "config-adapt-c.yaml").write_text("lr: 0.1  # a file of the user's, named alike\n")
    (run / "tensorboard" / "adapt-c").mkdir()
    (run / "tensorboard" / "adapt-c" / "events.out.tfevents.3.host.4.0").write_text("x")
    clear_run(run)
    left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert left == sorted([*users, "config-adapt-c.yaml"])
    assert not (run / "tensorboard" / "adapt-c").exists()  # emptied folders go too


def test_overwrite_with_data_that_cannot_be_loaded_leaves_the_run_as_it_was(run_copy, capsys):
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    for tasks in ("synth_color,nosuchtask", "npz:nowhere.npz"):
        argv = ["train", "--tasks", tasks, *TINY, *FAST, "--out", str(run_copy), "--overwrite"]
        assert main(argv) == 2
        assert "modnet train: error:" in capsys.readouterr().err
        assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before
    fresh = run_copy.parent / "fresh"
    argv = ["train", "--tasks", "synth_color,nosuchtask", *TINY, *FAST, "--out", str(fresh)]
    assert main(argv) == 2
    assert "unknown dataset 'nosuchtask'" in capsys.readouterr().err
    assert not fresh.exists()  # a new run is refused before anything is written


def test_save_model_never_replaces_a_run_or_its_checkpoints(run_copy):
    model, _ = io.load_model(run_copy)
    latest = io.latest_checkpoint(run_copy)
    with pytest.raises(CheckpointError, match=r"run is a modnet run directory: save the model"):
        io.save_model(model, run_copy)
    with pytest.raises(CheckpointError, match=f"{latest.name} is a checkpoint of the run"):
        io.save_model(model, latest)
    assert io.load_trainer_state(latest) is not None


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    assert main(train_args(target)) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    assert target.read_text() == "keep"


# ----------------------------------------------------------------------- 2. pruning
def test_pruning_removes_only_checkpoints_modnet_wrote(tmp_path):
    model = tiny_conv(tasks={"a": 3})
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        state = {"phase": "train", "done": False, "step": step}
        io.save_checkpoint(tmp_path, f"train-step{step:07d}", model, state)
        if step == 1:  # a user's folders appear in the run
            (checkpoints / "user_folder").mkdir(parents=True)
            (checkpoints / "user_folder" / "data.txt").write_text("x")
            (checkpoints / "train-step0000000").mkdir()  # modnet's pattern, but no manifest
            (checkpoints / "train-step0000000" / "x.txt").write_text("x")
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == ["train-step0000000", "train-step0000003", "train-step0000004", "user_folder"]
    assert (checkpoints / "user_folder" / "data.txt").read_text() == "x"


def test_pruning_keeps_the_finished_phase_an_unfinished_one_started_from(tmp_path):
    model = tiny_conv(tasks={"a": 3})
    io.save_checkpoint(tmp_path, "train-step0000001", model, {"phase": "train", "done": True})
    model.add_task("b", 2)
    for step in (1, 2, 3):
        state = {"phase": "transfer-b", "done": False, "step": step}
        io.save_checkpoint(tmp_path, f"transfer-b-step{step:07d}", model, state)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["train-step0000001", "transfer-b-step0000002", "transfer-b-step0000003"]


# ------------------------------------------------------------------------ 3. LATEST
def _two_phase_run(root: Path) -> Path:
    model = tiny_conv(tasks={"a": 3})
    config = json.dumps({})
    io.save_checkpoint(
        root, "train-step0000001", model, dict(phase="train", done=True, config=config)
    )
    model.add_task("b", 2)
    state = dict(phase="transfer-b", done=True, config=config)
    io.save_checkpoint(root, "transfer-b-step0000001", model, state)
    return root


@pytest.mark.parametrize("damage", ["missing", "garbage", "names_a_deleted_checkpoint"])
def test_a_missing_or_damaged_latest_is_recovered_never_retrained(tmp_path, damage, capsys):
    run = _two_phase_run(tmp_path / "run")
    latest = run / "LATEST"
    if damage == "missing":
        latest.unlink()
    elif damage == "garbage":
        latest.write_bytes(b"\x00\x01\xfe")
    else:
        latest.write_text("train-step0000099\n")
    with pytest.warns(io.RecoveryWarning, match="newest complete checkpoint transfer-b-step"):
        assert io.latest_checkpoint(run).name == "transfer-b-step0000001"
        model, _ = io.load_model(run)
    assert model.task_names == ["a", "b"]
    # train must neither retrain over the run nor prune the transferred task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(train_args(run)) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert latest.read_text().strip() == "transfer-b-step0000001"  # repaired under the lock
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "train-step0000001",
        "transfer-b-step0000001",
    ]


def test_a_damaged_latest_with_no_checkpoint_left_is_an_error(tmp_path):
    run = _two_phase_run(tmp_path / "run")
    for checkpoint in (run / "checkpoints").iterdir():
        shutil.rmtree(checkpoint)
    with pytest.raises(CheckpointError, match="LATEST names 'transfer-b.*no complete checkpoint"):
        io.latest_checkpoint(run)


# ------------------------------------------------------------ 5. resume with options
def test_resuming_with_other_options_is_refused_with_the_list(
    tmp_path, capsys, interrupt_after_first_checkpoint
):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        main(train_args(out, "--checkpoint-every", "1"))
    before = io.latest_checkpoint(out).name
    changed = ["--lr", "0.5", "--epochs", "2", "--model-arg", "width=16"]
    assert main(train_args(out, "--checkpoint-every", "1", *changed)) == 2
    err = capsys.readouterr().err
    assert "started with other options" in err
    assert "epochs: 1 -> 2" in err and "-> 0.5" in err and "'width': 8" in err
    assert io.latest_checkpoint(out).name == before
    # options that cannot change the result may differ
    neutral = ["--log-every", "3", "--checkpoint-every", "2", "--device", "cpu"]
    assert main(train_args(out, *neutral)) == 0
    state = io.load_trainer_state(io.latest_checkpoint(out))
    assert state["done"] and state["step"] == state["total_steps"]


def test_resuming_a_transfer_with_other_parts_is_refused(
    run_copy, capsys, monkeypatch, interrupt_after_first_checkpoint
):
    with pytest.raises(Interrupt):
        main(transfer_args(run_copy, "synth_shape", "--checkpoint-every", "1"))
    assert main(transfer_args(run_copy, "synth_shape", "--train", "route")) == 2
    assert "parts: ['heads', 'norm', 'routes'] -> ['norm', 'routes']" in capsys.readouterr().err


def test_resuming_an_adaptation_with_another_objective_is_refused(
    run_copy, capsys, interrupt_after_first_checkpoint
):
    adapt = ["adapt", str(run_copy), "--target", "synth_size-bg", "--sources", "synth_size"]
    with pytest.raises(Interrupt):
        main([*adapt, *FAST, "--checkpoint-every", "1"])
    assert main([*adapt, *FAST, "--objective", "entropy"]) == 2
    assert "objective: 'moments' -> 'entropy'" in capsys.readouterr().err
    assert main([*adapt, *FAST, "--log-every", "1"]) == 0  # same options: resumes


# -------------------------------------------------------------------------- 6. phases
def test_an_unfinished_phase_blocks_the_others_and_discard_keeps_finished_tasks(
    run_copy, capsys, interrupt_after_first_checkpoint
):
    base = io.latest_checkpoint(run_copy)
    finished_files = file_bytes(base)
    with pytest.raises(Interrupt):
        main(transfer_args(run_copy, "synth_shape", "--checkpoint-every", "1", "--log-every", "1"))
    assert io.latest_checkpoint(run_copy).name.startswith("transfer-synth_shape-step")
    blocked = [
        transfer_args(run_copy, "synth_position"),
        train_args(run_copy),
        ["adapt", str(run_copy), "--target", "synth_position", *FAST],
    ]
    for args in blocked:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "unfinished phase 'transfer-synth_shape'" in err and "modnet discard" in err
    # what reads the run says which task is partly trained: eval notes it, export refuses it
    partly = (
        f"the phase 'transfer-synth_shape' of {run_copy} is unfinished, so synth_shape is partly "
        f"trained: run its command again to finish it, or `modnet discard {run_copy}`"
    )
    assert main(["eval", str(run_copy), "--test-limit", "8", "--json"]) == 0
    assert f"modnet: {partly}\n" in capsys.readouterr().err
    assert main(["export", str(run_copy), "--task", "synth_shape"]) == 2
    assert capsys.readouterr().err.endswith(f"task 'synth_shape' is not exported: {partly}\n")
    assert main(["eval", str(run_copy), "--task", "synth_color", "--test-limit", "8"]) == 0
    assert "partly" not in capsys.readouterr().err  # the pool it shares did not change
    # TensorBoard's files of the phase: an attempt from before the base stays, the
    # discarded one goes (files are named after the second they were created)
    board = run_copy / "tensorboard" / "transfer-synth_shape"
    board.mkdir(parents=True)
    earlier = board / "events.out.tfevents.1000000000.host.1.0"
    discarded = board / f"events.out.tfevents.{int(time.time()) + 1}.host.2.0"
    for file in (earlier, discarded, board / "notes.txt"):
        file.write_text("x")
    assert main(["discard", str(run_copy)]) == 0
    assert sorted(p.name for p in board.iterdir()) == [earlier.name, "notes.txt"]
    assert f"continues from {base.name}" in capsys.readouterr().out
    assert {r["phase"] for r in read_metrics(run_copy / "metrics.jsonl")} == {"train"}
    assert '"phase": "transfer-synth_shape", "step": 1' in (run_copy / "metrics.jsonl").read_text()
    assert io.latest_checkpoint(run_copy) == base
    assert file_bytes(base) == finished_files
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [base.name]
    model, _ = io.load_model(run_copy)
    assert model.task_names == ["synth_color", "synth_size"]
    assert main(["discard", str(run_copy)]) == 2
    assert "no unfinished phase" in capsys.readouterr().err
    assert main(transfer_args(run_copy, "synth_position")) == 0


def test_an_unfinished_grow_leaves_the_old_tasks_exportable(
    run_copy, capsys, interrupt_after_first_checkpoint, tmp_path
):
    # --grow adds templates, which changes the pool's fingerprint, but the old tasks
    # compute what they did: only the new task is partly trained
    grow = transfer_args(run_copy, "synth_shape", "--grow", "1", "--train", "route,head")
    with pytest.raises(Interrupt):
        main([*grow, "--checkpoint-every", "1"])
    assert "-step" in io.latest_checkpoint(run_copy).name
    assert main(["eval", str(run_copy), "--test-limit", "8", "--json"]) == 0
    assert ", so synth_shape is partly trained" in capsys.readouterr().err
    out = tmp_path / "synth_color.pt2"
    assert main(["export", str(run_copy), "--task", "synth_color", "--out", str(out)]) == 0
    assert out.is_file()
    capsys.readouterr()
    new = tmp_path / "synth_shape.pt2"
    assert main(["export", str(run_copy), "--task", "synth_shape", "--out", str(new)]) == 2
    assert "so synth_shape is partly trained" in capsys.readouterr().err
    assert not new.exists()


def test_an_unfinished_train_blocks_transfer(tmp_path, capsys, interrupt_after_first_checkpoint):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        main(train_args(out, "--checkpoint-every", "1"))
    assert main(transfer_args(out, "synth_shape")) == 2
    assert re.search(r"unfinished phase 'train' \(step 1 of \d+\)", capsys.readouterr().err)
    assert main(["discard", str(out)]) == 0
    assert io.latest_checkpoint(out) is None and not list((out / "checkpoints").iterdir())
    assert main(train_args(out)) == 0


# ------------------------------------------------------------------------ 10. crashes
def test_leftovers_of_a_killed_write_are_removed_at_the_next_start(run_copy, capsys):
    checkpoint = io.latest_checkpoint(run_copy)
    leftovers = [
        run_copy / "checkpoints" / ".train-step0000009.tmp-4242",
        run_copy / "checkpoints" / ".train-step0000004.old-4242",
        checkpoint / ".trainer_state.tmp-4242.pt",
        run_copy / ".results.tmp-4242.json",
        run_copy / "checkpoints" / ".train-step0000009.modnet-tmp-4243",
        run_copy / ".config.modnet-tmp-4243.yaml",
    ]
    for path in leftovers:
        if path.suffix:
            path.write_bytes(b"half")
        else:
            (path / "tasks").mkdir(parents=True)
    (run_copy / ".my-hidden-notes").write_text("mine")
    assert main(train_args(run_copy)) == 2  # finished: refused, but tidied first
    assert "already holds a finished run" in capsys.readouterr().err
    assert not any(path.exists() for path in leftovers)
    assert (run_copy / ".my-hidden-notes").read_text() == "mine"


def test_hidden_user_files_named_like_leftovers_are_kept(run_copy):
    mine = [
        run_copy / ".notes.tmp-1.txt",
        run_copy / ".metrics.old-20240101.jsonl",
        run_copy / "checkpoints" / ".keep.old-2024",
        run_copy / "checkpoints" / ".mine.tmp-7",
    ]
    for path in mine:
        path.write_text("mine")
    with io.open_run(run_copy, "modnet test"):
        pass
    assert all(path.read_text() == "mine" for path in mine)


def test_a_checkpoint_is_published_only_with_its_trainer_state(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model = tiny_conv(tasks={"a": 3})
    first = io.save_checkpoint(run, "train-step0000001", model, {"phase": "train", "done": False})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) while the trainer state is written

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(run, "train-step0000002", model, {"phase": "train", "done": False})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]
    assert io.latest_checkpoint(run) == first


def test_a_checkpoint_an_older_version_left_without_trainer_state_is_never_latest(tmp_path, capsys):
    run = tmp_path / "run"
    model = tiny_conv(tasks={"a": 3})
    first = io.save_checkpoint(run, "train-step0000001", model, {"phase": "train", "done": False})
    half = io.save_checkpoint(run, "train-step0000002", model, {"phase": "train", "done": False})
    manifest = json.loads((half / "manifest.json").read_text())
    manifest["checkpoint"].pop("trainer_state", None)  # as older versions wrote it
    (half / "manifest.json").write_text(json.dumps(manifest))
    (half / "trainer_state.pt").unlink()  # killed before the trainer state was written
    with pytest.warns(io.RecoveryWarning, match="not a complete checkpoint"):
        assert io.latest_checkpoint(run) == first  # LATEST names it: not complete
    (run / "LATEST").unlink()
    (run / "checkpoints" / first.name / "trainer_state.pt").unlink()
    shutil.rmtree(first)
    assert io.latest_checkpoint(run) is None  # not recovered as the newest either
    assert io.is_run_dir(run)
    assert main(["discard", str(run)]) == 2
    assert "nothing to discard" in capsys.readouterr().err


def test_a_folder_left_by_a_kill_while_the_run_was_created_is_a_new_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in (".lock", ".lock.info", "..modnet-run.tmp-4242", "..modnet-run.modnet-tmp-4243"):
        (out / name).write_text("")
    with io.open_run(out, "modnet test"):
        names = sorted(p.name for p in out.iterdir())
    assert names == [".lock", ".lock.info", ".modnet-run"]
    (out / "notes.txt").write_text("mine")
    (out / ".modnet-run").unlink()
    with pytest.raises(RunDirError, match="not a modnet run directory"):
        io.check_run_target(out)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_user_entry_named_like_a_future_checkpoint_is_refused_not_deleted(tmp_path, kind):
    run = tmp_path / "run"
    model = tiny_conv(tasks={"a": 3})
    io.save_checkpoint(run, "train-step0000001", model, {"phase": "train", "done": False})
    mine = run / "checkpoints" / "train-step0000002"
    if kind == "folder":
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
    else:
        mine.write_text("mine")
    with pytest.raises(RunDirError, match=f"{mine} is not a checkpoint modnet wrote.*move it out"):
        io.save_checkpoint(run, mine.name, model, {"phase": "train", "done": False})
    assert (mine / "notes.txt" if kind == "folder" else mine).read_text() == "mine"
    assert io.latest_checkpoint(run).name == "train-step0000001"


def test_a_pruning_a_kill_left_unfinished_is_finished_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    model = tiny_conv(tasks={"a": 3})
    for step in range(1, 5):  # as if killed while pruning: every checkpoint is left
        state = {"phase": "train", "done": step == 4}
        io.save_checkpoint(run, f"train-step{step:07d}", model, state, keep=10)
    with io.open_run(run, "modnet test"):
        names = [p.name for p in io.modnet_checkpoints(run)]
    assert names == ["train-step0000003", "train-step0000004"]


def test_a_run_killed_before_its_results_completes_them_when_run_again(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise Interrupt

    monkeypatch.setattr(train_api, "_record_results", killed)
    with pytest.raises(Interrupt):
        main(train_args(out))
    monkeypatch.undo()
    assert not (out / "results.json").exists()  # the figures come first
    (out / "routes.png").unlink()
    state = io.load_trainer_state(io.latest_checkpoint(out))
    assert state["done"]
    assert main(train_args(out)) == 0
    assert "wrote its missing results" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    history = json.loads(state["history"])
    assert results["train"]["accuracy"] == history[-1]["accuracy"]
    assert results["train"]["checkpoint"] == io.latest_checkpoint(out).name
    assert (out / "routes.png").stat().st_size > 0
    assert main(train_args(out)) == 2  # now complete: a finished run
    assert "already holds a finished run" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "transfer", "adapt"])
def test_a_phase_stopped_right_after_its_results_keeps_its_options_file(
    run_copy, tmp_path, monkeypatch, command
):
    """The options file is written just before the results: a stop right after the
    results (Ctrl-C while figures are drawn) cannot leave a complete phase without it."""
    recorded = io.record_results

    def record_then_stop(*args, **kwargs):
        recorded(*args, **kwargs)
        raise Interrupt

    args, out, phase, name = {
        "train": (train_args(tmp_path / "new"), tmp_path / "new", "train", "config.yaml"),
        "transfer": (
            transfer_args(run_copy),
            run_copy,
            "transfer-synth_shape",
            "config-transfer-synth_shape.yaml",
        ),
        "adapt": (
            ["adapt", str(run_copy), "--target", "synth_size-bg", "--sources", "synth_size", *FAST],
            run_copy,
            "adapt-synth_size-bg",
            "config-adapt-synth_size-bg.yaml",
        ),
    }[command]
    monkeypatch.setattr(io, "record_results", record_then_stop)
    with pytest.raises(Interrupt):
        main(args)
    monkeypatch.undo()
    assert phase in io.read_results(out)
    saved = (out / name).read_text()
    assert saved.startswith(io.run.SAVED_OPTIONS_HEADER + command)
    assert "epochs: 1" in saved and "train_limit: 64" in saved
    if command == "adapt":
        assert "sources: synth_size\n" in saved  # the sources it used


def test_a_damaged_results_file_is_named_before_any_work(run_copy, capsys):
    (run_copy / "results.json").write_text('{"train": ')
    before = io.latest_checkpoint(run_copy)
    assert main(transfer_args(run_copy)) == 2
    err = capsys.readouterr().err
    assert f"{run_copy / 'results.json'} is damaged" in err
    assert io.latest_checkpoint(run_copy) == before


def test_a_folder_named_results_json_is_named_in_one_line(run_copy, capsys):
    (run_copy / "results.json").unlink()
    (run_copy / "results.json").mkdir()
    assert main(transfer_args(run_copy)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modnet transfer: error: {run_copy / 'results.json'} is not a file")
    assert len(err.splitlines()) == 1 and (run_copy / "results.json").is_dir()


def test_export_with_a_file_named_export_in_the_run_is_one_line(run_copy, capsys):
    (run_copy / "export").write_text("mine")
    assert main(["export", str(run_copy), "--task", "synth_color"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modnet export: error: {run_copy / 'export'} is a file")
    assert len(err.splitlines()) == 1 and (run_copy / "export").read_text() == "mine"


# ---------------------------------------------------------------------- 11. durability
def test_checkpoint_files_and_folders_are_fsynced_before_they_are_published(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    state = {"phase": "train", "done": False}
    target = io.save_checkpoint(run, "train-step0000001", tiny_conv(tasks={"a": 3}), state)
    renames = [e for e in events if e[0] == "replace"]
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
    tmp_dir = events[publish][1]
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    files = ("manifest.json", "pool.safetensors", "tasks/a.safetensors", "trainer_state.pt")
    for name in (*files, "tasks", ""):  # the trainer state too: published only complete
        assert str(Path(tmp_dir) / name).rstrip("/") in synced_before, name
    assert ("fsync", str(target.parent)) in events[publish:]  # the rename itself is durable
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("LATEST"))
    assert publish < latest
    tmp_latest = events[latest][1]
    assert ("fsync", tmp_latest) in events[:latest]
    assert ("fsync", str(run)) in events[latest:]
    assert len(renames) >= 2


# ------------------------------------------------------- pool fingerprint, task import
def test_a_task_file_imports_into_a_run_with_the_same_pool_only(tmp_path):
    source = moved_off_init(tiny_conv(tasks={"a": 3, "b": 5}))
    source.set_route("b", torch.randn(4, 3))
    io.save_model(
        source, tmp_path / "source", {"b": {"transform": {"mean": [0.1] * 3, "std": [0.2] * 3}}}
    )
    target, manifest = io.load_model(tmp_path / "source", tasks=["a"])
    assert manifest["pool_fingerprint"] == io.pool_fingerprint(source)
    x = images(source)
    assert io.import_task(target, tmp_path / "source" / "tasks" / "b.safetensors") == "b"
    assert io.import_task(target, tmp_path / "source", task="b", name="b_copy") == "b_copy"
    with pytest.raises(CheckpointError, match=r"source has no task 'c'; it has \['a', 'b'\]$"):
        io.import_task(target, tmp_path / "source", task="c")
    source.eval()
    with torch.no_grad():
        assert torch.equal(target(x, "b"), source(x, "b"))
        assert torch.equal(target(x, "b_copy"), source(x, "b"))
        assert torch.equal(target(x, "a"), source(x, "a"))
    # the task's input normalisation comes with it, from a file or a directory alike
    assert target.task_normalization == {
        name: {"mean": (0.1,) * 3, "std": (0.2,) * 3} for name in ("b", "b_copy")
    }
    other = moved_off_init(tiny_conv(tasks={"a": 3}), scale=0.3)
    assert io.pool_fingerprint(other) != io.pool_fingerprint(source)
    with pytest.raises(CheckpointError, match="trained with another pool"):
        io.import_task(other, tmp_path / "source" / "tasks" / "b.safetensors")
    assert other.task_names == ["a"]


def test_run_dir_error_is_a_project_error():
    from modnet.errors import ModnetError

    assert issubclass(RunDirError, ModnetError) and issubclass(CheckpointError, ModnetError)


def test_an_adaptation_killed_before_its_results_completes_them(run_copy, monkeypatch, capsys):
    from modnet.adapt import api as adapt_api

    def killed(*args, **kwargs):
        raise Interrupt

    args = ["adapt", str(run_copy), "--target", "synth_size-bg", "--sources", "synth_size", *FAST]
    monkeypatch.setattr(adapt_api, "_record", killed)
    with pytest.raises(Interrupt):
        main(args)
    monkeypatch.undo()
    state = io.load_trainer_state(io.latest_checkpoint(run_copy))
    assert state["done"] and "adapt-synth_size-bg" not in io.read_results(run_copy)
    assert main(args) == 0
    assert "wrote its missing results" in capsys.readouterr().err
    entry = io.read_results(run_copy)["adapt-synth_size-bg"]
    assert (
        entry["adapted_accuracy"] == json.loads(state["history"])[-1]["accuracy"]["synth_size-bg"]
    )
    assert entry["checkpoint"] == io.latest_checkpoint(run_copy).name
    trace = json.loads(state["loss_trace"])  # the whole trace is in the trainer state
    assert entry["first_loss"] == trace[0] and entry["last_loss"] == trace[-1]
    assert (run_copy / "adapt-synth_size-bg-routes.png").is_file()
    assert main(args) == 2
    assert "already has a task 'synth_size-bg'" in capsys.readouterr().err


SHARED_PHASES = {
    "transfer": transfer_args(Path("RUN"), "synth_shape", "--train", "route,head,templates"),
    "adapt": ["adapt", "RUN", "--target", "synth_size-bg", "--sources", "synth_size",
              "--train", "route,stem", *FAST],
}  # fmt: skip


@pytest.mark.slow  # end to end: a phase stopped, then the same command again
@pytest.mark.parametrize(
    ("command", "stop"), [("transfer", "record_results"), ("adapt", "mark_outdated")]
)
def test_a_shared_phase_stopped_before_its_results_or_marks_completes_them(
    run_copy, tmp_path, monkeypatch, command, stop
):
    """Stopped after its last checkpoint, before its results or the outdated marks of
    the tasks it changed, the same command writes results.json as an uninterrupted run."""
    reference = tmp_path / "reference"
    shutil.copytree(run_copy, reference)

    def args(run_dir):
        line = [str(run_dir) if a == "RUN" else a for a in SHARED_PHASES[command]]
        return [*line, "--update-shared"]

    def killed(*args, **kwargs):
        raise Interrupt

    monkeypatch.setattr(io, stop, killed)
    with pytest.raises(Interrupt):
        main(args(run_copy))
    monkeypatch.undo()
    assert main(args(run_copy)) == 0
    assert main(args(reference)) == 0
    assert io.read_results(run_copy)["train"]["outdated"]  # as the reference has them
    assert io.read_results(run_copy) == io.read_results(reference)


PHASE_ARGS = {
    "train": [*TRAIN, "--out", "RUN"],
    "transfer": transfer_args(Path("RUN")),
    "adapt": ["adapt", "RUN", "--target", "synth_size-bg", "--sources", "synth_size", *FAST],
}
PHASE_FIGURES = {
    "train": [],
    "transfer": [],
    "adapt": ["adapt-synth_size-bg-routes.png"],
}
# One figure per command is deleted from the complete phase (every one is checked
# by the same code; a rerun per figure and command cost a minute of the suite).
DELETED_FIGURE = {
    "train": "routes.txt",
    "transfer": "curves.png",
    "adapt": "adapt-synth_size-bg-routes.png",
}


@pytest.mark.slow  # end to end: a phase stopped, then the same command again
@pytest.mark.parametrize("command", ["train", "transfer", "adapt"])
def test_a_phase_stopped_while_its_figures_are_drawn_completes_them(
    run_copy, tmp_path, monkeypatch, capsys, command
):
    """Ctrl-C while curves.png is drawn: the same command writes what is missing, as
    it says; a figure deleted from a complete phase is redrawn the same way."""
    import modnet.plot

    out = tmp_path / "new" if command == "train" else run_copy
    args = [str(out) if a == "RUN" else a for a in PHASE_ARGS[command]]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(modnet.plot, "save_learning_curves", interrupted)
    assert main(args) == 130
    assert "the same command resumes it" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args) == 0
    assert "wrote its missing results" in capsys.readouterr().err
    figures = ["routes.png", "routes.txt", "curves.png", *PHASE_FIGURES[command]]
    assert all((out / name).is_file() for name in figures)
    phase = {"train": "train", "transfer": "transfer-synth_shape"}.get(
        command, "adapt-synth_size-bg"
    )
    assert io.read_results(out)[phase]["checkpoint"] == io.latest_checkpoint(out).name
    name = DELETED_FIGURE[command]
    (out / name).unlink()
    assert main(args) == 0, name
    assert all((out / n).is_file() for n in figures)
    assert main(args) == 2  # complete: refused as before


def test_training_shared_parts_while_adding_a_task_needs_update_shared(run_copy, capsys):
    """A new task alone never changes the others; training what all tasks share does,
    so transfer and adapt refuse it, before any work, unless asked to."""
    before = file_bytes(io.latest_checkpoint(run_copy))
    model = io.load_model(run_copy)[0]
    x = images(model)
    with torch.no_grad():
        old = {t: model(x, task=t) for t in model.task_names}
    for command in (
        transfer_args(run_copy, "synth_shape", "--train", "route,head,templates"),
        transfer_args(run_copy, "synth_shape", "--train", "all"),
        ["adapt", str(run_copy), "--target", "synth_size-bg", "--train", "route,stem", *FAST],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "so the run's existing tasks would change" in err
        assert "pass --update-shared (update_shared=True) to accept that" in err
    # a part the run does not have trains nothing: said before any work
    hyper = transfer_args(run_copy, "synth_shape", "--train", "hypernet", "--update-shared")
    assert main(hyper) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--train hypernet: this run has no hypernetwork (its routes are softmax)" in err
    assert file_bytes(io.latest_checkpoint(run_copy)) == before
    args = transfer_args(run_copy, "synth_shape", "--train", "route,head,templates")
    assert main([*args, "--update-shared"]) == 0
    assert (
        "modnet: templates trained, so synth_color, synth_size changed too; the accuracies "
        "recorded for them are from before (results.json marks them outdated): "
        f"`modnet eval {run_copy}` scores them now"
    ) in capsys.readouterr().err
    recorded = io.read_results(run_copy)
    outdated = dict.fromkeys(["synth_color", "synth_size"], "transfer-synth_shape")
    assert recorded["train"]["outdated"] == outdated
    assert "outdated" not in recorded["transfer-synth_shape"]
    model = io.load_model(run_copy)[0]
    with torch.no_grad():
        assert all(not torch.equal(model(x, task=t), old[t]) for t in old)  # as accepted


def test_plotting_a_run_stopped_before_its_first_logged_step_is_a_user_error(
    tmp_path, capsys, interrupt_after_first_checkpoint
):
    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        main(train_args(out, "--checkpoint-every", "1"))
    assert io.latest_checkpoint(out) is not None and not read_metrics(out / "metrics.jsonl")
    capsys.readouterr()
    assert main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"modnet plot: error: {out} has logged no training step yet, so there are no curves "
        "to draw: run its command again to resume it, or draw its routes alone with "
        f"`modnet routes {out}`\n"
    )
    assert not (out / "routes.png").exists()  # refused before any figure is written


def test_a_retry_stopped_before_its_first_checkpoint_keeps_the_held_attempts_curves(
    run_copy, monkeypatch, capsys
):
    """``transfer --overwrite`` stopped before its first checkpoint leaves the run holding
    the earlier attempt's weights, so ``metrics.jsonl`` still reads as that attempt's;
    a retry that saved its checkpoint but was stopped before marking it counts once
    it resumes."""

    def curve(run):
        return [
            (r["step"], r.get("loss"))
            for r in read_metrics(run / "metrics.jsonl")
            if r["phase"] == "transfer-synth_shape"
        ]

    assert main(transfer_args(run_copy, "synth_shape", "--log-every", "1")) == 0
    held, latest = curve(run_copy), io.latest_checkpoint(run_copy).name
    assert len(held) == 3  # two loss records and one accuracy record

    def stopped(self, done):
        raise Interrupt  # after the retry logged its records, before its first checkpoint

    again = transfer_args(run_copy, "synth_shape", "--log-every", "1", "--lr", "0.5")
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "checkpoint", stopped)
        with pytest.raises(Interrupt):
            main([*again, "--overwrite"])
    assert io.latest_checkpoint(run_copy).name == latest
    assert curve(run_copy) == held  # before the fix: the stopped retry's records

    saved = io.save_checkpoint

    def saved_then_stopped(*args, **kwargs):
        saved(*args, **kwargs)
        raise Interrupt  # the checkpoint is complete; its mark in metrics.jsonl is not

    with monkeypatch.context() as patch:
        patch.setattr(io, "save_checkpoint", saved_then_stopped)
        with pytest.raises(Interrupt):
            main([*again, "--overwrite", "--checkpoint-every", "1"])
    assert curve(run_copy) == held  # the run holds the new checkpoint, not yet marked
    assert main([*again, "--checkpoint-every", "1"]) == 0  # resumes and marks it
    retried = curve(run_copy)
    assert [s for s, _ in retried] == [s for s, _ in held] and retried != held
