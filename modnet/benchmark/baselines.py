"""The baselines modnet is held to: the plain timm twin and naive output mixing."""

from __future__ import annotations

import torch
from torch import nn

from ..model import ModularNet


def plain_twin(model: ModularNet, task: str) -> nn.Module:
    """The plain timm network of the same shape as ``model`` running ``task``.

    For the ViT family: timm's ``VisionTransformer`` with the same dimensions and
    depth, holding the task's (baked-in) weights. For every other family: the
    task's ``ExportedNet``, a plain ``nn.Sequential`` of the family's timm blocks
    between the same stem and head. Either computes the same logits as the model.
    """
    exported = model.export(task)
    if model.config.get("family") != "vit":
        return exported
    from timm.models.vision_transformer import VisionTransformer

    cfg = model.config
    vit = VisionTransformer(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        in_chans=cfg["in_chans"],
        num_classes=model.heads[task].out_features,
        embed_dim=cfg["embed_dim"],
        depth=len(exported.blocks),
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        global_pool=cfg["global_pool"],
    )
    state = {
        k: v for k, v in exported.trunk.model.state_dict().items() if k.split(".")[0] != "head"
    }
    state.update({f"blocks.{k}": v for k, v in exported.blocks.state_dict().items()})
    state.update({f"head.{k}": v for k, v in exported.head.state_dict().items()})
    vit.load_state_dict(state)
    reference = next(model.parameters())
    return vit.to(device=reference.device, dtype=reference.dtype).train(model.training)


class OutputMixingNet(nn.Module):
    """The naive mixture of experts: run all K templates per layer, mix their outputs.

    The reference that weight mixing is measured against: layer ``l`` computes
    ``sum_k c[l, k] * block(x; T[k])`` with the task's soft-route coefficients,
    where modnet computes ``block(x; sum_k c[l, k] T[k])``, K times fewer block
    evaluations. It runs the model's own pool, trunk, norm statistics and head, so
    the two differ only in where the mixing happens.

    Args:
        model: A ModularNet; it is shared, not copied.
        task: A task with an isotropic soft route (or any route resolving to
            ``[L, K]`` coefficients).
    """

    def __init__(self, model: ModularNet, task: str):
        super().__init__()
        model._task(task)
        if model.routes[task].plan(model.hypernet).coefficients is None:
            raise ValueError(
                f"task {task!r} has a hard route: output mixing needs mixing coefficients, "
                "give the task a soft route (model.set_route(task, coefficients))"
            )
        self.model = model
        self.task = task

    def coefficients(self) -> torch.Tensor:
        plan = self.model.routes[self.task].plan(self.model.hypernet)
        if plan.coefficients.ndim != 2:
            raise ValueError(
                "output mixing needs one coefficient per (layer, template): anisotropic "
                "routes mix each weight tensor differently and have no output-mixing twin"
            )
        return plan.coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model, pool = self.model, self.model.pool
        stats = model.norm_stats[self.task]
        coefficients = self.coefficients()
        templates = [pool.select(k) for k in range(coefficients.shape[1])]
        x = model._trunk_stage("embed", x, stats)
        for layer in range(coefficients.shape[0]):
            layer_stats = stats.layer(layer)
            mixed = None
            for k, weights in enumerate(templates):
                out = coefficients[layer, k] * pool.run(x, weights, layer_stats)
                mixed = out if mixed is None else mixed + out
            x = mixed
        x = model._trunk_stage("norm", x, stats)
        return model._head(x, self.task, pre_logits=False)
