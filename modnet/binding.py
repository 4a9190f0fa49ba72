"""Run a module with tensors that it does not own.

Weight mixing produces fresh tensors for every layer; running a block with them
must cost what calling the block costs. ``torch.func.functional_call`` adds tens
of microseconds per call in eager mode, which shows at small batch sizes, so in
eager mode we assign the tensors straight into the module's parameter and buffer
slots and put the originals back afterwards. Under ``torch.compile`` we use
``functional_call``, which dynamo traces natively.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call


class TensorBinder:
    """Calls ``module`` with some of its parameters and buffers replaced.

    Not thread-safe: the replacement is visible to other threads for the duration
    of one call. Process-based data parallelism (DDP) is unaffected.

    With ``follow_replacement``, the submodules that own the supplied tensors are
    looked up again whenever one of them is no longer at its path: utilities such
    as ``timm.layers.convert_sync_batchnorm`` or ``timm.utils.model.freeze`` swap
    BatchNorm layers for new modules, and the tensors must then go into the new
    ones. A replacement that lacks one of the tensors (timm's
    ``FrozenBatchNorm2d`` has no ``num_batches_tracked``) does not get it. The
    check is one dictionary lookup per link of each owner's path, every call.

    Args:
        module: The module to run. It is not registered as a child of anything.
        names: Dotted names of the parameters/buffers that callers will supply.
        follow_replacement: Whether to follow submodules replaced after
            construction (modules registered in a model, which timm utilities can
            swap); template blocks, which nothing outside modnet can reach, keep
            the slots found at construction.

    Raises:
        KeyError: ``module`` has no parameter or buffer by one of ``names``.
    """

    def __init__(self, module: nn.Module, names: Iterable[str], follow_replacement: bool = False):
        self.module = module
        self.names = tuple(names)
        self.follow_replacement = follow_replacement
        # How many times the slots were found again: whatever was built for the
        # modules in place (a grouped copy of them) is stale once this moves.
        self.resolutions = 0
        self._slots: list[tuple[str, dict[str, Any], str]] = []
        for name in self.names:
            owner_path, _, attr = name.rpartition(".")
            slots = _slots_of(module.get_submodule(owner_path), attr)
            if slots is None:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer named '{name}'")
            self._slots.append((name, slots, attr))
        self._links = self._path_links() if follow_replacement else ()

    def _path_links(self) -> tuple[tuple[dict[str, Any], str, nn.Module], ...]:
        """``(parent._modules, key, child)`` along every owner's path, each link once."""
        links: dict[tuple[int, str], tuple[dict[str, Any], str, nn.Module]] = {}
        for name in self.names:
            owner = self.module
            path = name.rpartition(".")[0]
            for key in path.split(".") if path else ():
                child = owner._modules[key]
                links.setdefault((id(owner._modules), key), (owner._modules, key, child))
                owner = child
        return tuple(links.values())

    def _resolve(self) -> None:
        """Finds the slots again in the modules now at the owners' paths."""
        self._slots = []
        for name in self.names:
            owner_path, _, attr = name.rpartition(".")
            slots = _slots_of(self.module.get_submodule(owner_path), attr)
            if slots is not None:
                self._slots.append((name, slots, attr))
        self._links = self._path_links()
        self.resolutions += 1

    def current(self) -> list[tuple[str, dict[str, Any], str]]:
        """The slots of the modules now in place (resolved again after a swap)."""
        for modules, key, child in self._links:
            if modules.get(key) is not child:
                self._resolve()
                break
        return self._slots

    def __call__(self, tensors: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        current = self.current()
        if torch.compiler.is_compiling():
            if len(current) < len(self.names):
                tensors = {name: tensors[name] for name, _, _ in current}
            return functional_call(self.module, dict(tensors), args, kwargs, tie_weights=False)
        # the module's own tensors as they are now: .to(dtype or device) replaces them
        originals = [slots[attr] for _, slots, attr in current]
        for name, slots, attr in current:
            slots[attr] = tensors[name]
        try:
            return self.module(*args, **kwargs)
        finally:
            for (_, slots, attr), original in zip(current, originals, strict=True):
                slots[attr] = original


def _slots_of(owner: nn.Module, attr: str) -> dict[str, Any] | None:
    """The dictionary holding ``owner``'s parameter or buffer ``attr``, if it has one."""
    if attr in owner._parameters:
        return owner._parameters
    if attr in owner._buffers:
        return owner._buffers
    return None


def mangle(name: str) -> str:
    """Turns a dotted tensor name into one that can be registered on a module."""
    return name.replace(".", "__")


def is_batchnorm_buffer(module: nn.Module, name: str) -> bool:
    """True for running statistics, which modnet keeps per task instead of sharing."""
    owner_path, _, _ = name.rpartition(".")
    return isinstance(module.get_submodule(owner_path), nn.modules.batchnorm._BatchNorm)
