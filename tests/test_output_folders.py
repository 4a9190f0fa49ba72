"""modnet's own outputs in modnet's folders: a model folder keeps what modnet's commands
wrote into it when ``save_model`` replaces it, and an export is never written among
the files of a run, a checkpoint or a saved model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modnet import io
from modnet.cli import main
from modnet.errors import CheckpointError, ConfigError
from tests.conftest import tiny_conv


def model_with(*tasks: str):
    model = tiny_conv()
    for name in tasks:
        model.add_task(name, 3)
    return model


def contents(folder) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_save_model_keeps_what_routes_and_export_wrote_into_the_folder(tmp_path, capsys):
    saved = tmp_path / "saved"
    io.save_model(model_with("a"), saved)
    # what `modnet routes saved [--task a]` writes (drawing it imports matplotlib: a second)
    for name in ("routes.png", "routes.txt", "routes-a.png", "routes-a.txt"):
        (saved / name).write_text(f"the figure {name}")
    assert main(["export", str(saved), "--task", "a", "--format", "safetensors"]) == 0
    # what `modnet export saved --task a` writes, a zip archive (tracing it takes seconds)
    (saved / "export" / "a.pt2").write_bytes(b"PK\x03\x04" + bytes(60))
    outputs = {
        name: data for name, data in contents(saved).items() if not name.startswith("tasks/")
    }
    del outputs["manifest.json"], outputs["pool.safetensors"]
    assert sorted(outputs) == [
        "export/a.pt2",
        "export/a/config.json",
        "export/a/model.safetensors",
        "routes-a.png",
        "routes-a.txt",
        "routes.png",
        "routes.txt",
    ]
    io.save_model(model_with("b"), saved)  # the model is replaced, its outputs kept as they were
    after = contents(saved)
    assert {name: after[name] for name in outputs} == outputs
    assert sorted(p.name for p in (saved / "tasks").iterdir()) == ["b.safetensors"]
    assert list(io.load_model(saved)[1]["tasks"]) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]  # no leftover folder
    io.save_model(model_with("c"), saved)  # and again: what it kept is still modnet's
    assert {name: contents(saved)[name] for name in outputs} == outputs


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda d: (d / "notes.txt").write_text("mine"), "notes.txt"),
        (
            lambda d: (d / "export").mkdir() or (d / "export" / "x.txt").write_text("mine"),
            "export/x.txt",
        ),
        (
            lambda d: (d / "export").mkdir() or (d / "export" / "a.pt2").write_text("mine"),
            "export/a.pt2",
        ),
        (
            lambda d: (
                (d / "export" / "a").mkdir(parents=True)
                or (d / "export" / "a" / "config.json").write_text("{}")
            ),
            "export/a/config.json",
        ),
        (lambda d: os.symlink(d / "manifest.json", d / "routes.png"), "routes.png"),
        (lambda d: (d / "routes.png").mkdir(), "routes.png"),
    ],
)
def test_save_model_still_refuses_what_modnet_did_not_write(tmp_path, make, named):
    saved = tmp_path / "saved"
    io.save_model(model_with("a"), saved)
    make(saved)
    before = contents(saved)
    with pytest.raises(CheckpointError) as caught:
        io.save_model(model_with("b"), saved)
    assert str(caught.value) == (
        f"{saved} holds {named}, which is not part of a saved model (saving replaces the whole "
        "folder): save the model to a new or empty folder, or move that out first"
    )
    assert contents(saved) == before


def test_figures_without_a_model_are_not_a_model_folder(tmp_path):
    folder = tmp_path / "figs"
    folder.mkdir()
    (folder / "routes.png").write_bytes(b"\x89PNG")
    with pytest.raises(CheckpointError, match=r"figs holds routes.png, which is not part of a"):
        io.save_model(model_with("a"), folder)
    assert contents(folder) == {"routes.png": b"\x89PNG"}


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """A run (one checkpoint) and a saved model, named relative to the current folder."""
    monkeypatch.chdir(tmp_path)
    model = model_with("a")
    io.save_checkpoint("run", "train-step0000001", model, {"phase": "train", "done": True})
    io.save_model(model, "saved")
    return model


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


RUN_REASON = "the run directory run, whose files modnet manages"
MODEL_REASON = "the saved model folder saved, which modnet.io.save_model replaces"


@pytest.mark.parametrize(
    "out, safe, reason",
    [
        ("run", True, RUN_REASON),
        ("run/a.pt2", False, RUN_REASON),
        ("run/export", True, RUN_REASON),  # export/ holds one folder per task
        ("run/export/x/a.pt2", False, RUN_REASON),
        ("run/export/other.pt2", False, RUN_REASON),  # another name than the task's
        ("run/export/other", True, RUN_REASON),  # a second task's folder, say
        ("saved", True, MODEL_REASON),
        ("saved/a.pt2", False, MODEL_REASON),
        ("saved/tasks", True, MODEL_REASON),
    ],
)
def test_export_out_among_a_runs_or_a_models_files_is_refused(folders, capsys, out, safe, reason):
    before = {name: contents(Path(name)) for name in ("run", "saved")}
    args = ["export", "run", "--task", "a", "--out", out]
    assert main([*args, "--format", "safetensors"] if safe else args) == 2
    default = "run/export/a" if safe else "run/export/a.pt2"
    assert one_line_error(capsys) == (
        f"modnet export: error: --out {out} would put the export into {reason} (an export "
        f"belongs in its export/ folder): leave out --out to write {default} (the default), "
        "or choose a folder outside it"
    )
    assert {name: contents(Path(name)) for name in ("run", "saved")} == before


def test_export_out_in_an_export_folder_or_a_users_folder_is_written(folders, capsys):
    args = ["export", "run", "--task", "a", "--format", "safetensors"]
    for out in ("run/export/a", "saved/export/a", "run/mine/a"):
        assert main([*args, "--out", out]) == 0
        assert sorted(p.name for p in Path(out).iterdir()) == ["config.json", "model.safetensors"]
    assert main(args) == 0  # the default, run/export/a, is replaced
    io.save_model(folders, "saved")  # which keeps saved/export/a as modnet's
    assert (Path("saved") / "export" / "a" / "model.safetensors").is_file()


def test_the_python_export_functions_refuse_those_folders_too(folders):
    from modnet.export import save_exported, save_safe

    net = folders.export("a")
    with pytest.raises(ConfigError) as caught:
        save_safe(net, folders.config, "run")
    assert str(caught.value) == (
        f"directory run would put the export into {RUN_REASON} (an export belongs in its "
        "export/ folder): write to run/export/a/, or choose a folder outside it"
    )
    with pytest.raises(ConfigError) as caught:
        save_exported(net, "saved/a.pt2")  # refused before tracing
    assert str(caught.value) == (
        f"path saved/a.pt2 would put the export into {MODEL_REASON} (an export belongs in "
        "its export/ folder): write to saved/export/a.pt2, or choose a folder outside it"
    )
    checkpoint = Path("run/checkpoints/train-step0000001")
    with pytest.raises(ConfigError) as caught:
        save_safe(net, folders.config, checkpoint / "export" / "a")
    assert str(caught.value) == (
        f"directory {checkpoint}/export/a would put the export into the checkpoints of the "
        "run run, which modnet prunes as the run goes on (an export belongs in its export/ "
        "folder): write to run/export/a/, or choose a folder outside it"
    )
    assert not (checkpoint / "export").exists() and not Path("run/export").exists()
    assert save_safe(net, folders.config, "run/export/a") == Path("run/export/a")
