"""Data-parallel training step on 2 gloo ranks: DistributedDataParallel vs hand reduction.

The trainer's steps run through DDP (``modnet.train.step.StepRunner``); the
baseline is the reduction it replaced: backward, then one flat all-reduce of
every gradient (``all_reduce_gradients``), clip and AdamW step. Both sides run in
the same two processes in alternating rounds (see ``ddp_step.py``); the ratio is
steps/s of DDP over steps/s of the hand reduction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from modnet.benchmark import Ratio

WORKER = Path(__file__).with_name("ddp_step.py")


def test_ddp_step_vs_hand_reduction_on_two_ranks(benchmark, record, request, tmp_path):
    benchmark.group = "distributed"
    rounds = max(2, round(8 * request.config.getoption("--bench-scale")))
    threads = str(request.config.getoption("--bench-threads"))
    out = tmp_path / "seconds.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(WORKER),
        str(out),
        str(rounds),
        "5",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    done = benchmark.pedantic(
        subprocess.run,
        args=(command,),
        kwargs=dict(env=env, capture_output=True, text=True, timeout=900),
        rounds=1,
        iterations=1,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seconds = json.loads(out.read_text())
    ratios = [m / d for d, m in zip(seconds["ddp"], seconds["manual"], strict=True)]
    for side, values in seconds.items():
        benchmark.extra_info[f"{side}_seconds_per_step"] = sorted(values)[len(values) // 2]
    record("DDP step / hand reduction (steps/s)", Ratio.of(ratios))
