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
    for process in (resumed, reference):
        output = process.communicate(timeout=300)[0].decode()
        assert process.returncode == 0, output
    params, optimizer = final_state(tmp_path / "killed")
    ref_params, ref_optimizer = final_state(tmp_path / "reference")
    for key, value in ref_params.items():
        assert torch.equal(params[key], value), key
    for index, slots in ref_optimizer.items():
        for name, value in slots.items():
            assert torch.equal(optimizer[index][name], value), (index, name)
