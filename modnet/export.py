"""A task's network with its route baked in: a plain stack of real blocks.

Two file formats:

- ``save_exported``: a ``torch.export`` program (``.pt2``). Loading one with
  ``torch.export.load`` unpickles parts of the file, which can run code from it:
  load only ``.pt2`` files you trust.
- ``save_safe``: the network's weights as a safetensors state dict plus a JSON
  config (``model.safetensors``, ``config.json``). Nothing in the files is run;
  ``load_safe`` rebuilds the network from the config with the family's blocks
  (timm's ``InvertedResidual`` or ViT ``Block``) and loads the tensors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.layers import DropPath
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
        # The task's preprocessing record when the export carries one (``load_safe``).
        self.transform: dict | None = None
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
        for block, rate in zip(blocks, model.drop_path_rates, strict=False):
            for module in block.modules():
                if isinstance(module, DropPath):
                    module.drop_prob = rate  # each exported layer keeps its position's rate
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


# The task's preprocessing record inside a .pt2 archive (``torch.export.save``'s extra files).
PT2_TRANSFORM = "transform.json"


def check_export_target(
    path: str | Path, task: str, safe: bool, option: str, default: Path | None = None
) -> None:
    """Refuses, before any work, an export that would land among modnet's own files.

    A run directory, a checkpoint inside one and a saved model folder are modnet's:
    ``train --overwrite`` and ``save_model`` clear or replace them knowing only
    their own files, so an export written among those would be left behind or
    block them. In such a folder an export belongs in its ``export/`` folder, as
    ``modnet export`` writes it by default: ``export/<task>.pt2`` or
    ``export/<task>/`` (``io.run.OUTPUT_FOLDERS``), not at its top nor elsewhere
    in ``export/``, ``tasks/`` or ``tensorboard/`` (a folder of the user's inside
    it is the user's); nothing goes into a checkpoint, which modnet prunes.

    Args:
        path: The ``.pt2`` file, or the folder of a safetensors export.
        task: The exported task, for the suggested path.
        safe: Whether ``path`` is a safetensors folder (else a ``.pt2`` file).
        option: What named ``path``, for the message (``--out``, ``directory``).
        default: Where the command writes by default, suggested instead (``None``:
            the owning folder's own ``export/`` place is suggested).

    Raises:
        ConfigError: Naming the folder, why and where to write instead, in one line.
    """
    from .errors import ConfigError
    from .io.checkpoint import FORMAT, MANIFEST, TASK_DIR
    from .io.run import CHECKPOINTS, OUTPUT_FOLDERS, is_run_dir

    given = Path(path)
    file = given / SAFE_WEIGHTS if safe else given
    folders = [file.absolute().parent, *file.absolute().parent.parents]
    shown = [file.parent, *file.parent.parents]  # as given, then absolute
    shown += folders[len(shown) :]

    def owned(folder: Path) -> bool:  # an unreadable folder is not looked into
        try:
            return is_run_dir(folder)
        except OSError:
            return False

    for folder in folders:
        pruned = folder.name == CHECKPOINTS and owned(folder.parent)
        if pruned or owned(folder) or _model_folder(folder, FORMAT, MANIFEST):
            break
    else:
        return
    inside = file.absolute().relative_to(folder).as_posix()
    checkpoint = folder.parent.name == CHECKPOINTS and owned(folder.parent.parent)
    if pruned or checkpoint:
        run = folder.parent if pruned else folder.parent.parent
        what = f"the checkpoints of the run {shown[folders.index(run)]}"
        why = "which modnet prunes as the run goes on"
    else:
        run = folder
        top, _, rest = inside.partition("/")
        if top == "export" and rest == (f"{task}/{SAFE_WEIGHTS}" if safe else f"{task}.pt2"):
            return  # the task's own place, which modnet clears and keeps as its own
        if rest and top not in (TASK_DIR, *OUTPUT_FOLDERS):
            return  # a folder of the user's in it, which modnet leaves alone
        name = shown[folders.index(folder)]
        what, why = (
            (f"the run directory {name}", "whose files modnet manages")
            if owned(folder)
            else (f"the saved model folder {name}", "which modnet.io.save_model replaces")
        )
    own = shown[folders.index(run)] / "export" / (task if safe else f"{task}.pt2")
    instead = (
        f"leave out {option} to write {default} (the default)"
        if default is not None
        else f"write to {own}{'/' if safe else ''}"
    )
    raise ConfigError(
        f"{option} {given} would put the export into {what}, {why} (an export belongs "
        f"in its export/ folder): {instead}, or choose a folder outside it"
    )


def _model_folder(folder: Path, format: str, manifest: str) -> bool:
    """Whether ``folder`` holds a modnet model directory's manifest."""
    try:
        return json.loads((folder / manifest).read_text()).get("format") == format
    except (OSError, ValueError, AttributeError):
        return False


def save_exported(
    net: ExportedNet,
    path: str | Path,
    batch_size: int = 1,
    transform: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves ``net`` with ``torch.export`` (dynamic batch size), atomically.

    The file loads with PyTorch alone: ``torch.export.load(path).module()``. Loading
    a ``.pt2`` file can execute code stored in it: share it only with people who
    trust its source, or use ``save_safe``.

    Args:
        net: The baked network (``ModularNet.export(task)``).
        path: The ``.pt2`` file.
        batch_size: Batch of the example input that is traced (the saved program
            takes any batch size).
        transform: The task's preprocessing record (its manifest's ``transform``:
            size, channels, resize, mean and std, class names), stored as the extra
            file ``transform.json`` (without local paths, see ``shareable``); read it
            back with ``load_transform``.
        overwrite: Replace a file at ``path``; without it an existing file (perhaps
            not modnet's) is refused.

    Returns:
        The file.

    Raises:
        ConfigError: ``path`` is a folder, lies among a run's, a checkpoint's or a
            saved model's own files (``check_export_target``), or exists and
            ``overwrite`` is not set (before tracing).
    """
    from .errors import ConfigError
    from .io import atomic_write
    from .io.fs import refuse_existing

    if Path(path).is_dir():
        raise ConfigError(f"{path} is a folder: give the .pt2 file to write, e.g. {path}/model.pt2")
    check_export_target(path, net.task, safe=False, option="path")
    if not overwrite:
        refuse_existing([Path(path)], "path", "overwrite=True")
    channels, height, width = net.input_size
    example = torch.randn(max(2, batch_size), channels, height, width)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))
    extra = {PT2_TRANSFORM: json.dumps(shareable(transform))} if transform is not None else None
    atomic_write(Path(path), lambda tmp: torch.export.save(program, tmp, extra_files=extra))
    return Path(path)


def load_transform(path: str | Path) -> dict | None:
    """The preprocessing record an export carries (a ``.pt2`` file or a ``save_safe``
    folder), for ``modnet.data.apply_transform`` and the mean and std that follow it;
    ``None`` when it was exported without one.

    A ``.pt2`` file is read as the zip archive it is, without loading its program.

    Raises:
        CheckpointError: No such export, or not one (a damaged file).
    """
    import zipfile

    from .errors import CheckpointError

    path = Path(path)
    try:
        if path.is_dir():
            return json.loads((path / SAFE_CONFIG).read_text()).get("transform")
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{PT2_TRANSFORM}")]
            return json.loads(archive.read(names[0])) if names else None
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"cannot read an export at {path}: {error}") from None


def shareable(transform: dict | None) -> dict | None:
    """The record without the exporting machine's paths (a data root, a file): what
    a preprocessing record needs is sizes, channels, resize, statistics and classes."""
    if not isinstance(transform, dict):
        return transform
    out = {}
    for key, value in transform.items():
        if key in ("root", "path"):
            continue
        out[key] = shareable(value) if isinstance(value, dict) else value
    return out


SAFE_FORMAT = "modnet-exported/1"
SAFE_WEIGHTS = "model.safetensors"
SAFE_CONFIG = "config.json"


def save_safe(
    net: ExportedNet,
    model_config: dict[str, Any],
    directory: str | Path,
    transform: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves ``net`` as ``model.safetensors`` (its state dict) and ``config.json``.

    Neither file contains code: ``load_safe`` rebuilds the network from the config
    and only reads tensors, so the files are safe to load from any source. A task
    without a head (0 classes) is saved too: it gives the pooled features.

    Args:
        net: The baked network (``ModularNet.export(task)``).
        model_config: ``model.config`` of the model it came from (family and sizes).
        directory: Output folder (created; both files are written atomically).
        transform: The task's preprocessing record (as for ``save_exported``),
            kept in ``config.json`` and read back as ``load_safe(...).transform``.
        overwrite: Replace ``model.safetensors`` and ``config.json`` in ``directory``;
            without it either one existing (perhaps not modnet's) is refused.

    Returns:
        The folder.

    Raises:
        ConfigError: ``directory`` is a run directory, a checkpoint or a saved model
            folder, or lies among their own files (``check_export_target``), or a
            file to be written exists and ``overwrite`` is not set (before anything
            is written).
    """
    from safetensors.torch import save_file

    from .io import atomic_write, write_json
    from .io.fs import refuse_existing
    from .model import _head_classes

    directory = Path(directory)
    check_export_target(directory, net.task, safe=True, option="directory")
    if not overwrite:
        refuse_existing(
            [directory / SAFE_WEIGHTS, directory / SAFE_CONFIG], "directory", "overwrite=True"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(directory / SAFE_WEIGHTS, lambda tmp: save_file(state, tmp))
    config = dict(
        format=SAFE_FORMAT,
        model_config=dict(model_config),
        task=net.task,
        num_classes=_head_classes(net.head),
        num_blocks=len(net.blocks),
        input_size=list(net.input_size),
    )
    if transform is not None:
        config["transform"] = shareable(transform)
    write_json(directory / SAFE_CONFIG, config)
    return directory


def load_safe(directory: str | Path) -> ExportedNet:
    """Rebuilds a network saved by ``save_safe`` (in eval mode), reading only tensors.

    Raises:
        CheckpointError: The folder is not such an export, or its files are damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import CheckpointError
    from .factory import build_model

    directory = Path(directory)
    try:
        config = json.loads((directory / SAFE_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{directory / SAFE_CONFIG} cannot be read: {error}") from None
    if not isinstance(config, dict) or config.get("format") != SAFE_FORMAT:
        raise CheckpointError(f"{directory / SAFE_CONFIG} is not a {SAFE_FORMAT} config")
    try:
        state = load_file(directory / SAFE_WEIGHTS)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{directory / SAFE_WEIGHTS} cannot be read: {error}") from None
    skeleton = build_model(config["model_config"])
    skeleton.add_task(config["task"], config["num_classes"], route=[0] * config["num_blocks"])
    net = ExportedNet.from_modular(skeleton, config["task"])
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{directory / SAFE_WEIGHTS} does not match its config: {error}"
        ) from None
    net.transform = config.get("transform")
    return net.eval()
