"""glibc malloc thresholds set by ``import modnet`` (``modnet.malloc``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import modnet
from modnet import malloc

glibc = pytest.mark.skipif(
    malloc._glibc() is None,
    reason="mallopt thresholds are glibc's",
)

# Eight training steps of a small conv model, each in a function as a trainer runs
# them: the losses, and the median minor page faults of the last five (the first
# steps build the heap).
STEPS = """
import json, resource, statistics
import timm, torch
import torch.nn.functional as F
import modnet
torch.set_num_threads(1)
torch.manual_seed(0)
model = timm.create_model("modnet_conv_tiny", tasks={"a": 10, "b": 10}, depth=4)
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
ids = torch.arange(32) % 2

def step():
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x, task=ids), y)
    loss.backward()
    optimizer.step()
    return loss.item()

losses, faults = [], []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    losses.append(step())
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"losses": losses, "faults": statistics.median(faults[3:])}))
"""


def _run(tune: str) -> dict:
    env = dict(os.environ, MODNET_TUNE_MALLOC=tune, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@glibc
def test_import_modnet_stops_the_page_faults_of_every_step_and_changes_no_result():
    tuned, untuned = _run("1"), _run("0")
    # glibc's thresholds map each step's activations afresh: a page fault per 4 KiB
    assert untuned["faults"] > 10_000, untuned
    assert tuned["faults"] < untuned["faults"] / 20, (tuned, untuned)
    assert tuned["losses"] == untuned["losses"]  # bit for bit


def _in_heap(address: int) -> bool:
    """Whether ``address`` lies in the brk heap (``[heap]`` of /proc/self/maps)."""
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = (int(a, 16) for a in line.split()[0].split("-"))
            return low <= address < high
    return False


@glibc
def test_tune_malloc_serves_a_30_mib_tensor_from_the_heap_and_is_idempotent(monkeypatch):
    monkeypatch.delenv("MODNET_TUNE_MALLOC", raising=False)
    assert malloc.tune_malloc() is True
    assert malloc.tune_malloc() is True
    assert malloc.tuned() is True
    assert modnet.tune_malloc is malloc.tune_malloc
    # glibc's own thresholds would map a block this large on its own (mmap)
    tensor = torch.empty(30 * 2**20, dtype=torch.uint8)
    assert _in_heap(tensor.data_ptr())


@pytest.mark.parametrize("value", ["disable", "n", "2"])
def test_a_value_that_is_neither_on_nor_off_warns_and_tunes(monkeypatch, value):
    monkeypatch.setenv("MODNET_TUNE_MALLOC", value)
    with pytest.warns(UserWarning, match=f"MODNET_TUNE_MALLOC='{value}' is neither on"):
        assert malloc._wanted() is True
    monkeypatch.setenv("MODNET_TUNE_MALLOC", " Yes ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert malloc._wanted() is True


RELEASE = """
import json, torch
from modnet import malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 // 2**20
big, kept = [], []
for _ in range(20):  # 24 MiB blocks, each below a small live one: not at the heap's top
    big.append(torch.ones(24 * 2**20, dtype=torch.uint8))
    kept.append(torch.ones(2**18, dtype=torch.uint8))
del big
held = rss()
released = malloc.release_memory()
print(json.dumps({"held": held, "after": rss(), "released": released}))
"""


@glibc
def test_release_memory_hands_back_freed_blocks_below_live_ones():
    done = subprocess.run(
        [sys.executable, "-c", RELEASE],
        env=dict(os.environ, MODNET_TUNE_MALLOC="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mib = json.loads(done.stdout.splitlines()[-1])
    assert mib["released"] is True
    assert mib["held"] - mib["after"] > 400, mib  # of the 480 MiB freed


@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_the_environment_variable_keeps_glibcs_thresholds(monkeypatch, value):
    monkeypatch.setenv("MODNET_TUNE_MALLOC", value)
    calls = []
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: calls.append(a))
    assert malloc.tune_malloc() is False
    assert calls == []  # the C library is not even looked up


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.delenv("MODNET_TUNE_MALLOC", raising=False)
    calls = []
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: calls.append(a))

    def no_glibc(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(malloc.os, "confstr", no_glibc)
    assert malloc.tune_malloc() is False
    monkeypatch.setattr(malloc.os, "confstr", lambda name: None)  # musl: no answer
    assert malloc.tune_malloc() is False
    assert calls == []


@glibc
def test_modnet_bench_records_whether_the_thresholds_were_set(tmp_path):
    script = """
import json, sys
from modnet.cli import main
main(["bench", "--model", "modnet_conv_tiny", "--model-arg", "depth=2", "--model-arg",
      "width=8", "--model-arg", "img_size=16", "--batch-size", "2", "--rounds", "1",
      "--warmup", "1", "--min-time", "0", "--no-memory", "--results-file", sys.argv[1]])
print(json.load(open(sys.argv[1]))[0]["malloc_tuned"])
"""
    rows = {}
    for tune in ("1", "0"):
        env = dict(os.environ, MODNET_TUNE_MALLOC=tune, OMP_NUM_THREADS="1")
        done = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"rows{tune}.json")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        rows[tune] = done.stdout.split()[-1]
    assert rows == {"1": "True", "0": "False"}
