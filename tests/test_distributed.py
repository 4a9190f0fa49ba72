"""Data parallel under torchrun (gloo) computes what one process computes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modnet import io

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


# ---------------------------------------------------------------- data parallel = one process
SCENARIOS = ROOT / "tests" / "ddp_scenarios.py"
ABSENT = ("heads.absent.", "routes.absent.", "norm_stats.absent.")


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *args]


def run(command: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(*processes: subprocess.Popen) -> None:
    for process in processes:
        output = process.communicate(timeout=600)[0]
        assert process.returncode == 0, output[-4000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """The same scenarios in one process (conv: 2 micro-batches of 4) and on 2 gloo ranks."""
    single, ranks = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ranks")
    finish(run([sys.executable, str(SCENARIOS), str(single), "4"]))
    finish(run(torchrun("--standalone", str(SCENARIOS), str(ranks), "0")))
    return single, ranks


def key_bias(value: torch.Tensor) -> torch.Tensor:
    """The key part of stacked ``[K, 3C]`` qkv biases."""
    width = value.shape[-1] // 3
    return value[..., width : 2 * width]


def assert_same_training(single: dict, ranks: dict) -> None:
    assert single["start"].keys() == ranks["start"].keys()
    moved = 0
    for key, start in single["start"].items():
        one, two = single["final"][key].double(), ranks["final"][key].double()
        assert torch.equal(ranks["start"][key], start), key
        if key.startswith(ABSENT):  # no step had this task: untouched on every rank
            assert torch.equal(single["final"][key], start), key
            assert torch.equal(ranks["final"][key], start), key
            continue
        if key.endswith("qkv__bias"):
            # Softmax ignores a key bias: its gradient is 0 up to rounding, which AdamW
            # scales to learning-rate-sized steps whatever the reduction order.
            assert torch.allclose(key_bias(one), key_bias(two), rtol=0, atol=1e-3), key
            key_bias(one).zero_()  # on the float64 copies; the rest is compared below
            key_bias(two).zero_()
        assert torch.allclose(one, two, rtol=0, atol=1e-5), key
        moved += not torch.equal(single["final"][key], start)
    assert moved > 20  # it trained: templates, routes, heads and statistics moved


@pytest.mark.parametrize("family", ["conv", "vit"])
@pytest.mark.parametrize("mixing", ["mixed", "alternate"])
def test_two_ranks_train_to_the_state_one_process_reaches(scenarios, family, mixing):
    single, ranks = (torch.load(d / f"{family}-{mixing}.pt") for d in scenarios)
    assert_same_training(single, ranks)
    # each rank scored its share of the test batches; the summed counts are the split's
    assert ranks["history"] == single["history"] and single["history"]


@pytest.mark.slow
def test_two_nodes_with_c10d_rendezvous_train_to_the_same_state(scenarios, tmp_path):
    port = free_port()
    nodes = [
        run(
            [
                *torchrun("--nnodes=2", nproc=1),
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}",
                "--rdzv_id=modnet-test",
                str(SCENARIOS),
                str(tmp_path),
                "0",
                "conv",
            ]
        )
        for _ in range(2)
    ]
    finish(*nodes)
    single, _ = scenarios
    for mixing in ("mixed", "alternate"):
        reference = torch.load(single / f"conv-{mixing}.pt")
        assert_same_training(reference, torch.load(tmp_path / f"conv-{mixing}.pt"))


ABSENT_STEP = """
import sys, torch, timm, modnet
import torch.nn.functional as F
from modnet.train.distributed import all_reduce_gradients, init_distributed
from modnet.train.parts import optimizer_groups
ctx = init_distributed("cpu")
torch.manual_seed(0)
net = timm.create_model("modnet_conv_tiny", tasks={"a": 3, "b": 3}, depth=2, width=8,
    img_size=16, exp_ratio=2.0, num_templates=2)
opt = torch.optim.AdamW(optimizer_groups(net, 3e-3, 3e-2, 3e-3, 0.01))
torch.manual_seed(1 + ctx.rank)
x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
before = {k: v.clone() for k, v in net.state_dict().items()}
F.cross_entropy(net(x, task="a"), y).backward()
all_reduce_gradients([p for p in net.parameters() if p.requires_grad], ctx)
opt.step()
if ctx.rank == 0:
    torch.save(dict(before=before, after=net.state_dict()), sys.argv[1])
"""


def test_hand_reduced_gradients_leave_a_task_no_rank_used_alone(tmp_path):
    script = tmp_path / "absent_step.py"
    script.write_text(ABSENT_STEP)
    finish(run(torchrun("--standalone", str(script), str(tmp_path / "two.pt"))))
    state = torch.load(tmp_path / "two.pt")
    for key, value in state["before"].items():
        if key.startswith(("heads.b.", "routes.b.", "norm_stats.b.")):
            assert torch.equal(state["after"][key], value), key
    assert not torch.equal(state["after"]["heads.a.weight"], state["before"]["heads.a.weight"])


TRANSFER = """
import sys, torch
from modnet.train import TrainConfig, transfer
config = TrainConfig(model_kwargs={}, train_limit=36, test_limit=9, epochs=1, batch_size=9,
    progress=False, device="cpu", log_every=100)
transfer(sys.argv[1], "synth_shape", parts="route,head", config=config)
"""


def test_a_transfer_on_three_ranks_leaves_every_other_task_bit_identical(tmp_path):
    from conftest import TINY_CONV

    from modnet.train import TrainConfig, train

    config = TrainConfig(
        model_kwargs=TINY_CONV,
        tasks=["synth_color", "synth_size"],
        train_limit=32,
        test_limit=8,
        epochs=1,
        batch_size=16,
        progress=False,
        device="cpu",
    )
    train(config, tmp_path / "run")
    before, _ = io.load_model(tmp_path / "run")
    script = tmp_path / "transfer.py"
    script.write_text(TRANSFER)
    finish(run(torchrun("--standalone", str(script), str(tmp_path / "run"), nproc=3)))
    after, _ = io.load_model(tmp_path / "run")
    assert after.task_names == ["synth_color", "synth_size", "synth_shape"]
    old = before.state_dict()
    new = after.state_dict()
    for key, value in old.items():
        assert torch.equal(new[key], value), key
    trained = [k for k in new if k not in old and "synth_shape" in k]
    assert any(k.startswith("routes.") for k in trained)
    stats = [k for k in trained if k.startswith("norm_stats.") and "running_mean" in k]
    assert stats and all(new[k].abs().sum() > 0 for k in stats)
