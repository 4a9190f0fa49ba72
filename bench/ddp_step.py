"""Worker of ``test_distributed.py``: a training step on 2 gloo ranks, DDP vs hand reduction.

Run under ``torchrun --nproc_per_node=2``. Both sides train their own copy of the
same model on the same mixed-task batch (32 per rank) with AdamW and clipping:
``ddp`` through ``modnet.train.step.StepRunner`` (DistributedDataParallel,
bucketed all-reduce overlapped with backward, then the all-reduce of the trained
tasks' BatchNorm statistics that the trainer does each step), ``manual`` by backward, then
``all_reduce_gradients`` (one flat all-reduce after backward), clip and step.
Rounds alternate the order; rank 0 writes the per-round seconds per step as JSON.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

from modnet.train.distributed import all_reduce_gradients, init_distributed
from modnet.train.parts import optimizer_groups
from modnet.train.step import StepRunner

TASKS = {"a": 10, "b": 10, "c": 10}
BATCH = 32
MODEL = dict(depth=4, width=16, exp_ratio=4.0, img_size=16, num_templates=4)


def main(out: str, rounds: int, steps: int) -> None:
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    model = timm.create_model("modnet_conv_tiny", tasks=TASKS, **MODEL)
    generator = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(BATCH, 3, 16, 16, generator=generator)
    y = torch.randint(0, 10, (BATCH,), generator=generator)
    ids = torch.arange(BATCH) % len(TASKS)

    def loss_of(net):
        return F.cross_entropy(net(x, task=ids), y) / ctx.world_size

    ddp_model, manual_model = model, copy.deepcopy(model)
    ddp = StepRunner(
        [ddp_model],
        lambda step, share: (loss_of(ddp_model), BATCH),
        optimizer_groups(ddp_model, 1e-3, 1e-2, 1e-3, 0.05),
        total_steps=10**6,
        grad_clip=1.0,
        ctx=ctx,
        statistics=lambda: list(ddp_model.norm_stats.buffers()),
    )
    params = [p for p in manual_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(optimizer_groups(manual_model, 1e-3, 1e-2, 1e-3, 0.05))

    def manual_step(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(manual_model).backward()
        all_reduce_gradients(params, ctx)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    sides = {"ddp": ddp.run, "manual": manual_step}
    for side in sides.values():  # warm-up
        for step in range(2):
            side(step)
    seconds = {name: [] for name in sides}
    for index in range(rounds):
        order = list(sides) if index % 2 == 0 else list(reversed(sides))
        for name in order:
            dist.barrier()
            start = time.perf_counter()
            for step in range(steps):
                sides[name](step)
            dist.barrier()
            seconds[name].append((time.perf_counter() - start) / steps)
    if ctx.is_main:
        with open(out, "w") as handle:
            json.dump(seconds, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
