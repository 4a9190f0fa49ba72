"""A run killed with SIGKILL resumes and ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modnet import io

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "train",
    "--tasks",
    "synth_color,synth_size",
    "--model-arg",
    "depth=3",
    "--model-arg",
    "width=8",
    "--model-arg",
    "exp_ratio=2.0",
    "--model-arg",
    "img_size=16",
    "--train-limit",
    "240",
    "--test-limit",
    "40",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--checkpoint-every",
    "5",
    "--no-progress",
    "--seed",
    "7",
]
# The killed run is slowed down from the outside (the test wraps the trainer), so the
# kill reliably lands mid-run; the product code has no test hooks.
SLOW_MAIN = (
    "import sys, time\n"
    "from modnet.train.loop import Trainer\n"
    "step = Trainer._train_step\n"
    "Trainer._train_step = lambda self, s: (time.sleep(0.05), step(self, s))[1]\n"
    "from modnet.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_cli(out: Path, slow: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    prefix = ["-c", SLOW_MAIN] if slow else ["-m", "modnet"]
    return subprocess.Popen(
        [sys.executable, *prefix, *ARGS, "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = io.load_model(run_dir)
    state = io.load_trainer_state(io.latest_checkpoint(run_dir))
    assert state["done"] and state["step"] == state["total_steps"]
    return model.state_dict(), state["optimizer"]["state"]


def loss_records(run_dir: Path) -> list[tuple]:
    """The run's logged losses as ``modnet plot`` reads them: (phase, step, loss, lr)."""
    from modnet.plot import read_metrics

    records = read_metrics(run_dir / "metrics.jsonl")
    return [(r["phase"], r["step"], r["loss"], r["lr"]) for r in records if "loss" in r]


def test_killed_run_resumes_to_the_same_final_state(tmp_path):
    killed = run_cli(tmp_path / "killed", slow=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        latest = tmp_path / "killed" / "LATEST"
        if latest.is_file() and latest.read_text().strip() >= "train-step0000010":
            break
        assert killed.poll() is None, killed.stdout.read().decode()
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    interrupted_at = io.load_trainer_state(io.latest_checkpoint(tmp_path / "killed"))["step"]
    assert 10 <= interrupted_at < 60

    resumed = run_cli(tmp_path / "killed")
    reference = run_cli(tmp_path / "reference")
    outputs = []
    for process in (resumed, reference):
        outputs.append(process.communicate(timeout=300)[0].decode())
        assert process.returncode == 0, outputs[-1]
    said = f"modnet: resuming the interrupted train from its checkpoint at step {interrupted_at} of"
    assert said in outputs[0] and "resuming" not in outputs[1]  # said, even without a bar
    params, optimizer = final_state(tmp_path / "killed")
    ref_params, ref_optimizer = final_state(tmp_path / "reference")
    for key, value in ref_params.items():
        assert torch.equal(params[key], value), key
    for index, slots in ref_optimizer.items():
        for name, value in slots.items():
            assert torch.equal(optimizer[index][name], value), (index, name)
    # the first record after the resume averages the steps before the kill too
    assert loss_records(tmp_path / "killed") == loss_records(tmp_path / "reference")


# ------------------------------------------------------- transfer and adapt resume too
TINY = dict(depth=3, width=8, exp_ratio=2.0, img_size=16, num_templates=3)


class Interrupted(Exception):
    """Stands in for a kill: the phase stops mid-way, after its last checkpoint."""


def interrupt_at(monkeypatch, stop: int) -> None:
    from modnet.train.loop import Trainer

    step = Trainer._train_step

    def stopping(self, s):
        if s == stop:
            raise Interrupted
        return step(self, s)

    monkeypatch.setattr(Trainer, "_train_step", stopping)


def phase_state(run_dir: Path) -> tuple[dict, dict]:
    model, _ = io.load_model(run_dir)
    state = io.load_trainer_state(io.latest_checkpoint(run_dir))
    assert state["done"] and state["step"] == state["total_steps"]
    return model.state_dict(), state


def assert_resumed_identically(monkeypatch, tmp_path, source: Path, run) -> None:
    """Runs ``run(run_dir)`` interrupted at step 5 then again, and once uninterrupted."""
    import shutil

    def command(run_dir):
        torch.manual_seed(0)  # each run starts as a fresh process would
        run(run_dir)

    for name in ("killed", "reference"):
        shutil.copytree(source, tmp_path / name)
    with monkeypatch.context() as patch:
        interrupt_at(patch, 5)
        try:
            command(tmp_path / "killed")
        except Interrupted:
            pass
        else:
            raise AssertionError("the phase ended before the interruption")
    interrupted = io.load_trainer_state(io.latest_checkpoint(tmp_path / "killed"))
    assert interrupted["step"] == 3 and not interrupted["done"]
    command(tmp_path / "killed")
    command(tmp_path / "reference")
    params, state = phase_state(tmp_path / "killed")
    ref_params, ref_state = phase_state(tmp_path / "reference")
    assert params.keys() == ref_params.keys()
    for key, value in ref_params.items():
        assert torch.equal(params[key], value), key
    for index, slots in ref_state["optimizer"]["state"].items():
        for name, value in slots.items():
            assert torch.equal(state["optimizer"]["state"][index][name], value), (index, name)
    for key in set(ref_state) & {"objective"}:
        for name, value in ref_state[key].items():
            assert torch.equal(state[key][name], value), name
    # what the phase reports (adapt's first loss, its curve) covers the steps before too
    assert io.read_results(tmp_path / "killed") == io.read_results(tmp_path / "reference")
    # the killed run logged step 4; the resumed run logs it again, averaging steps 3 and 4
    assert loss_records(tmp_path / "killed") == loss_records(tmp_path / "reference")


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    from modnet.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("phases") / "run"
    config = TrainConfig(
        model_kwargs=TINY,
        tasks=["synth_size", "synth_size-bg"],
        train_limit=64,
        test_limit=16,
        epochs=1,
        batch_size=16,
        progress=False,
        device="cpu",
    )
    train(config, run_dir)
    return run_dir


def phase_config():
    from modnet.train import TrainConfig

    return TrainConfig(
        train_limit=48,
        test_limit=16,
        epochs=2,  # 6 steps of 16
        batch_size=16,
        checkpoint_every=3,
        micro_batch_size=8,
        log_every=2,
        progress=False,
        device="cpu",
    )


def test_an_interrupted_transfer_resumes_to_the_same_final_state(
    trained_tiny, tmp_path, monkeypatch
):
    from modnet.train import transfer

    def command(run_dir):
        transfer(
            run_dir,
            "synth_shape",
            parts="route,head,templates",
            config=phase_config(),
            update_shared=True,
        )

    assert_resumed_identically(monkeypatch, tmp_path, trained_tiny, command)


def test_an_interrupted_adaptation_resumes_to_the_same_final_state(
    trained_tiny, tmp_path, monkeypatch
):
    from modnet.adapt import adapt

    def command(run_dir):
        adapt(run_dir, "synth_size-color", objective="adversarial", parts="route,norm",
              config=phase_config())  # fmt: skip

    assert_resumed_identically(monkeypatch, tmp_path, trained_tiny, command)
