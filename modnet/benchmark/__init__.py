"""Throughput, peak memory and FLOP measurements, and the baselines modnet is held to.

Modularity must cost nothing at run time, so every figure modnet reports is a
ratio against a baseline measured in the same run (``timing``). The package
is split by concern:

- ``workloads``: devices, precisions, the steps that are timed (inference,
  training, dense matmul) and their inputs;
- ``timing``: interleaved rounds, per-round ratios and targets;
- ``memory``: peak memory of one step;
- ``flops``: FLOPs of one step (``torch.utils.flop_counter``);
- ``baselines``: the plain timm twin and naive output mixing;
- ``report``: progress, summary lines and result files of ``modnet bench``.
"""

from .baselines import OutputMixingNet, plain_twin
from .flops import count_flops, parameter_count
from .memory import peak_memory, quiet_profiler, storage_bytes
from .report import format_results, progress_printer, significant, summary_line, write_results
from .timing import Interleaver, Ratio, Target
from .workloads import (
    PRECISIONS,
    Precision,
    Workload,
    inference_workload,
    input_size,
    make_batch,
    matmul_workload,
    place,
    resolve_device,
    set_memory_format,
    synchronize,
    training_workload,
    uses_convolutions,
)

__all__ = [
    "PRECISIONS",
    "Interleaver",
    "OutputMixingNet",
    "Precision",
    "Ratio",
    "Target",
    "Workload",
    "count_flops",
    "format_results",
    "inference_workload",
    "input_size",
    "make_batch",
    "matmul_workload",
    "parameter_count",
    "peak_memory",
    "place",
    "plain_twin",
    "progress_printer",
    "quiet_profiler",
    "resolve_device",
    "set_memory_format",
    "significant",
    "storage_bytes",
    "summary_line",
    "synchronize",
    "training_workload",
    "uses_convolutions",
    "write_results",
]
