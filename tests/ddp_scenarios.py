"""Training scenarios run once in one process and once under torchrun (see test_distributed).

Usage: ``python ddp_scenarios.py OUT [MICRO_CONV]``, with or without ``torchrun``.
Each scenario trains tasks ``synth_color`` and ``synth_size`` of a tiny model that
also holds a trainable task ``absent`` no batch ever contains, for 20 steps of 8
samples, and rank 0 saves the starting and final state and the accuracies scored on
the way to ``OUT/<scenario>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_CONV, TINY_VIT  # noqa: E402

from modnet import io  # noqa: E402
from modnet.data import load_task  # noqa: E402
from modnet.train import TrainConfig, Trainer  # noqa: E402
from modnet.train.distributed import broadcast_state, init_distributed  # noqa: E402

FAMILIES = {"conv": ("modnet_conv_tiny", TINY_CONV), "vit": ("modnet_vit_tiny", TINY_VIT)}
TASKS = ("synth_color", "synth_size")


def scenario(family: str, mixing: str, micro: int, out: Path, ctx) -> None:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    size = kwargs["img_size"]
    data = {t: load_task(t, img_size=size, train_limit=40, test_limit=8, seed=0) for t in TASKS}
    for task in data.values():
        model.add_task(task.name, task.num_classes)
    model.add_task("absent", 3)
    model.set_trainable([*data, "absent"], "all")
    broadcast_state(model, ctx)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(
        model=name,
        batch_size=8,
        epochs=2,  # 80 samples: 10 steps an epoch
        mixing=mixing,
        micro_batch_size=micro,
        lr=1e-2,
        route_lr=5e-2,
        weight_decay=0.05,
        warmup_fraction=0.1,
        progress=False,
        log_every=100,
        eval_batch_size=3,  # 8 test images: batches for both ranks to score
    )
    run = out / f"{family}-{mixing}"
    with io.open_run(run, "scenario", enabled=ctx.is_main):
        trainer = Trainer(model, data, config, run, "train", ctx, {t: {} for t in data})
        trainer.fit()
    if ctx.is_main:
        state = dict(start=start, final=model.state_dict(), history=trainer.history)
        torch.save(state, f"{run}.pt")


def main() -> None:
    out, micro_conv = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0
    families = sys.argv[3].split(",") if len(sys.argv) > 3 else list(FAMILIES)
    ctx = init_distributed("cpu")
    for family in families:
        for mixing in ("mixed", "alternate"):
            scenario(family, mixing, micro_conv if family == "conv" else 0, out, ctx)


if __name__ == "__main__":
    main()
