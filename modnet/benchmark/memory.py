"""Peak memory of one step: resident state plus the highest transient allocation."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .workloads import Workload, synchronize


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views count once)."""
    seen: dict[tuple[str, int], int] = {}
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def peak_memory(workload: Workload) -> int:
    """Peak bytes of one step: resident state plus the highest transient allocation.

    One step runs first so that lazily created state (momentum buffers) is
    resident. On CUDA the transient part is ``max_memory_allocated`` above what was
    allocated before the step. On the CPU, where torch keeps no such counter, it is
    replayed from the profiler's record of every allocation and free made through
    torch's CPU allocator during the step (``profile_memory=True``), which is the
    same quantity.
    """
    workload.step()
    resident = storage_bytes(workload.state())
    device = workload.device
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        workload.step()
        synchronize(device)
        return resident + torch.cuda.max_memory_allocated(device) - before
    return resident + _cpu_transient_peak(workload.step)


# Above every severity of kineto's logger (VERBOSE 0 up to USDT 5 in torch 2.14).
KINETO_QUIET = "9"


@contextmanager
def quiet_profiler() -> Iterator[None]:
    """Keeps the profiler's C++ side (kineto) from logging to stderr.

    On the CPU, ``peak_memory`` runs ``torch.profiler``, whose kineto backend logs
    lines such as ``USDT: ... profiler_start`` and, without a GPU, ``ERROR: ...
    gpuGetDeviceCount failed``, none of which concern the measurement. Kineto reads
    ``KINETO_LOG_LEVEL`` once, when a process first starts the profiler, so this
    works only around that first use (as ``modnet bench`` does); a value the user
    set is kept, and the environment is restored on exit.
    """
    before = os.environ.get("KINETO_LOG_LEVEL")
    if before is None:
        os.environ["KINETO_LOG_LEVEL"] = KINETO_QUIET
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KINETO_LOG_LEVEL", None)


def _cpu_transient_peak(step: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    current = peak = 0
    for _, nbytes in sorted(events):
        current += nbytes
        peak = max(peak, current)
    return peak
