"""glibc malloc thresholds (``modnet.malloc.tune_malloc``) vs glibc's own, on the conv family.

Each side is a worker process (``malloc_worker.py``) that imports modnet with
``MODNET_TUNE_MALLOC`` at ``1`` (the default) or ``0``: the thresholds act on the
whole heap from the process's start, so one process cannot hold both. The
workers take turns, one step each per round (the order rotating), so both see the
same load; the ratio is steps/s of the tuned process over the untuned one.
Target: at least as fast (it changes no result, only whether freed memory is
mapped again). Linux with glibc only.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from modnet import malloc
from modnet.benchmark import Ratio, Target

WORKER = Path(__file__).with_name("malloc_worker.py")

pytestmark = pytest.mark.skipif(
    malloc._glibc() is None,
    reason="mallopt thresholds are glibc's",
)


def _worker(tuned: bool, threads: int) -> subprocess.Popen:
    env = dict(os.environ, MODNET_TUNE_MALLOC="1" if tuned else "0", OMP_NUM_THREADS=str(threads))
    command = [sys.executable, str(WORKER), str(threads)]
    return subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _step(worker: subprocess.Popen, step: str, timeout: float = 600.0) -> dict[str, float]:
    worker.stdin.write(step + "\n")
    worker.stdin.flush()
    # one line per request, so nothing waits in the reader's buffer: select sees it
    if not select.select([worker.stdout], [], [], timeout)[0]:
        worker.kill()
        raise RuntimeError(f"the malloc worker took over {timeout:.0f} s for one {step} step")
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"the malloc worker stopped (exit {worker.wait()})")
    return json.loads(line)


@pytest.mark.parametrize("step", ["train", "infer"])
def test_tuned_malloc_vs_glibc_thresholds(benchmark, record, request, step):
    benchmark.group = "malloc"
    threads = request.config.getoption("--bench-threads")
    rounds = max(2, round(6 * request.config.getoption("--bench-scale")))
    workers = {"tuned": _worker(True, threads), "glibc": _worker(False, threads)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in workers}

    def one_round() -> None:
        names = list(workers)
        shift = len(results["tuned"]) % 2
        for name in names[shift:] + names[:shift]:
            results[name].append(_step(workers[name], step))

    try:
        for worker in workers.values():  # warm-up: the first steps build the heap
            for _ in range(3):
                _step(worker, step)
        benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait(timeout=60)
    seconds = {name: [r["seconds"] for r in values] for name, values in results.items()}
    for name, values in results.items():
        faults = sorted(r["faults"] for r in values)[len(values) // 2]
        benchmark.extra_info[f"{name}_faults_per_step"] = faults
        benchmark.extra_info[f"{name}_seconds_per_step"] = sorted(seconds[name])[len(values) // 2]
    ratios = [g / t for t, g in zip(seconds["tuned"], seconds["glibc"], strict=True)]
    detail = "minor page faults per step (median): tuned {tuned_faults_per_step}, "
    detail += "glibc {glibc_faults_per_step}"
    record(
        f"{step} steps/s, tuned / glibc thresholds",
        Ratio.of(ratios),
        Target(">=", 1.0),
        detail=detail.format(**benchmark.extra_info),
    )
