"""Two processes under torchrun (gloo) train together and end with equal parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, torch
from modnet.train import TrainConfig, train
config = TrainConfig(model="modnet_conv_tiny", tasks=["synth_color", "synth_size"],
    model_kwargs=dict(depth=4, width=12, exp_ratio=2.0, img_size=16, num_templates=3),
    train_limit=480, test_limit=120, epochs=3, batch_size=32, lr=1e-2, route_lr=5e-2,
    progress=False, device="cpu", log_every=5)
result = train(config, sys.argv[1])
rank = torch.distributed.get_rank()
state = {k: v.clone() for k, v in result.model.state_dict().items()}
torch.save(state, f"{sys.argv[1]}/rank{rank}.pt")
"""


def test_two_process_gloo_run_trains_and_ranks_agree(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0 = torch.load(tmp_path / "run" / "rank0.pt")
    rank1 = torch.load(tmp_path / "run" / "rank1.pt")
    assert len(rank0) == len(rank1) > 0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # it really trained: the loss fell and colour (6 classes) is well above chance
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    assert losses[-1] < 0.7 * losses[0]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["accuracy"]["synth_color"] > 1 / 6 + 0.3
