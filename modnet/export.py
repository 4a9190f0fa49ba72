"""A task's network with its route baked in: a plain stack of real blocks."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import ModularNet


class ExportedNet(nn.Module):
    """Trunk, ``blocks`` and head of one task, with no pool, routes or other tasks.

    What a deployed task needs and nothing more; it is also the baseline a soft
    route is measured against, since it is exactly a plain network.
    """

    def __init__(self, trunk: nn.Module, blocks: nn.Sequential, head: nn.Module, task: str):
        super().__init__()
        self.trunk = trunk
        self.blocks = blocks
        self.head = head
        self.task = task
        self.num_features = getattr(trunk, "num_features", None)
        size = trunk.img_size or (224, 224)
        self.input_size = (trunk.in_chans, *size)

    @classmethod
    @torch.no_grad()
    def from_modular(cls, model: ModularNet, task: str) -> ExportedNet:
        model._task(task)
        stats = model.norm_stats[task]
        plan = model.routes[task].plan(model.hypernet)
        pool = model.pool
        if plan.indices is not None:
            per_layer = [pool.select(index) for index in plan.indices]
        else:
            mixed = pool.mix(plan.coefficients)
            per_layer = [{n: w[layer] for n, w in mixed.items()} for layer in range(plan.depth)]
        blocks = nn.Sequential(
            *[pool.build_block(weights, stats.layer(i)) for i, weights in enumerate(per_layer)]
        )
        trunk = copy.deepcopy(model.trunk)
        for name, value in stats.trunk().items():
            trunk.get_buffer(name).copy_(value)
        exported = cls(trunk, blocks, copy.deepcopy(model.heads[task]), task)
        return exported.train(model.training)

    def no_weight_decay(self) -> set[str]:
        """What timm's optimizer factory must not decay beyond 1-D tensors: the trunk's list."""
        return {
            f"{prefix}.{name}"
            for prefix, module in self.trunk.named_modules(prefix="trunk")
            if callable(getattr(module, "no_weight_decay", None))
            for name in module.no_weight_decay()
        }

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.norm(self.blocks(self.trunk.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.trunk.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def save_exported(net: ExportedNet, path: str | Path, batch_size: int = 1) -> Path:
    """Saves ``net`` with ``torch.export`` (dynamic batch size), atomically.

    The file loads with PyTorch alone: ``torch.export.load(path).module()``.
    """
    from .io import atomic_write

    channels, height, width = net.input_size
    example = torch.randn(max(2, batch_size), channels, height, width)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))
    atomic_write(Path(path), lambda tmp: torch.export.save(program, tmp))
    return Path(path)
