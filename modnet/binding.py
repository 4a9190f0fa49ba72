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

    Args:
        module: The module to run. It is not registered as a child of anything.
        names: Dotted names of the parameters/buffers that callers will supply.
    """

    def __init__(self, module: nn.Module, names: Iterable[str]):
        self.module = module
        self.names = tuple(names)
        self._slots: list[tuple[str, dict[str, Any], str]] = []
        for name in self.names:
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            if attr in owner._parameters:
                slots = owner._parameters
            elif attr in owner._buffers:
                slots = owner._buffers
            else:
                raise KeyError(f"{type(module).__name__} has no parameter or buffer named '{name}'")
            self._slots.append((name, slots, attr))

    def __call__(self, tensors: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return functional_call(self.module, dict(tensors), args, kwargs, tie_weights=False)
        # the module's own tensors as they are now: .to(dtype or device) replaces them
        originals = [slots[attr] for _, slots, attr in self._slots]
        for name, slots, attr in self._slots:
            slots[attr] = tensors[name]
        try:
            return self.module(*args, **kwargs)
        finally:
            for (_, slots, attr), original in zip(self._slots, originals, strict=True):
                slots[attr] = original


def mangle(name: str) -> str:
    """Turns a dotted tensor name into one that can be registered on a module."""
    return name.replace(".", "__")


def is_batchnorm_buffer(module: nn.Module, name: str) -> bool:
    """True for running statistics, which modnet keeps per task instead of sharing."""
    owner_path, _, _ = name.rpartition(".")
    return isinstance(module.get_submodule(owner_path), nn.modules.batchnorm._BatchNorm)
