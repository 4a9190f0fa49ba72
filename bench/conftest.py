"""Shared machinery of the benchmark suite: interleaved timing, records, the summary table.

Every benchmark measures modnet and its baseline in the same rounds (the order
rotates) and reports the median per-round ratio, so its figure holds on a
noisy machine. pytest-benchmark times each round (both sides together); the
ratios go into ``benchmark.extra_info`` (and so into ``--benchmark-json``) and
into the table printed at the end of the session.

Options:
    --bench-threads N   torch CPU threads (default 1: on a shared machine more
                        threads mostly measure OpenMP contention).
    --bench-scale F     multiplies the rounds of every benchmark (default 1).
    --enforce-targets   fail a benchmark whose ratio misses the design target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch

from modnet.benchmark import Interleaver, Ratio, Target, Workload

_RECORDS: list[Record] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modnet bench")
    group.addoption("--bench-threads", type=int, default=1, help="torch CPU threads")
    group.addoption("--bench-scale", type=float, default=1.0, help="scale every round count")
    group.addoption(
        "--enforce-targets", action="store_true", help="fail benchmarks that miss a target"
    )


def pytest_configure(config: pytest.Config) -> None:
    """Refuses option values the suite cannot run with, as a pytest usage error."""
    threads = config.getoption("--bench-threads")
    if threads < 1:
        raise pytest.UsageError(
            f"--bench-threads must be at least 1 (torch CPU threads), got {threads}"
        )
    scale = config.getoption("--bench-scale")
    if not (math.isfinite(scale) and scale > 0):
        raise pytest.UsageError(
            f"--bench-scale must be a number above 0 (it multiplies every round count), got {scale}"
        )


@dataclass(frozen=True)
class Record:
    """One row of the summary table."""

    group: str
    case: str
    metric: str
    ratio: Ratio
    target: Target | None
    detail: str


@pytest.fixture(scope="session", autouse=True)
def _threads(request: pytest.FixtureRequest):
    before = torch.get_num_threads()
    torch.set_num_threads(request.config.getoption("--bench-threads"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def record(benchmark, request: pytest.FixtureRequest):
    """Stores a ratio for the summary table and the JSON, and checks its target."""

    def add(
        metric: str,
        ratio: Ratio,
        target: Target | None = None,
        detail: str = "",
        key: str = "ratio",
    ) -> Ratio:
        group = benchmark.group or request.node.module.__name__.split(".")[-1]
        case = request.node.callspec.id if hasattr(request.node, "callspec") else ""
        _RECORDS.append(Record(group, case, metric, ratio, target, detail))
        benchmark.extra_info[key] = round(ratio.median, 4)
        benchmark.extra_info[f"{key}_iqr"] = [round(ratio.low, 4), round(ratio.high, 4)]
        benchmark.extra_info[f"{key}_metric"] = metric
        if target is not None:
            benchmark.extra_info[f"{key}_target"] = str(target)
            benchmark.extra_info[f"{key}_met"] = target.met(ratio.median)
            if request.config.getoption("--enforce-targets") and not target.met(ratio.median):
                pytest.fail(f"{metric} {ratio} misses its target {target}")
        return ratio

    return add


@pytest.fixture
def interleave(benchmark, request: pytest.FixtureRequest):
    """Times workloads in alternating rounds under pytest-benchmark; returns the timer.

    pytest-benchmark's own statistics are those of a whole round (every side once).
    """
    scale = request.config.getoption("--bench-scale")

    def run(
        workloads: Mapping[str, Workload], rounds: int = 8, min_time: float = 0.1, warmup: int = 2
    ) -> Interleaver:
        timer = Interleaver(workloads, min_time=min_time, warmup=warmup)
        timer.warmup()
        benchmark.pedantic(timer.round, rounds=max(1, round(rounds * scale)), iterations=1)
        benchmark.extra_info["threads"] = torch.get_num_threads()
        for name in workloads:
            if name != "matmul":  # the FLOP/s reference: its samples/s mean nothing
                samples = round(timer.samples_per_sec(name), 2)
                benchmark.extra_info[f"{name}_samples_per_sec"] = samples
        return timer

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _RECORDS:
        return
    write = terminalreporter.write_line
    terminalreporter.section("modnet ratios (median of per-round ratios, IQR)")
    threads = config.getoption("--bench-threads")
    write(f"torch {torch.__version__}, {threads} CPU thread(s)")
    header = f"{'group':<14} {'case':<18} {'metric':<40} {'ratio':>7}  {'IQR':<13} {'target':<8} ok"
    write(header)
    write("-" * len(header))
    for r in _RECORDS:
        ok = "" if r.target is None else ("yes" if r.target.met(r.ratio.median) else "NO")
        iqr = f"{r.ratio.low:.3f}-{r.ratio.high:.3f}"
        target = str(r.target) if r.target else ""
        write(
            f"{r.group:<14} {r.case:<18} {r.metric:<40} {r.ratio.median:>7.3f}  {iqr:<13} "
            f"{target:<8} {ok}"
        )
        if r.detail:
            write(f"{'':<34}{r.detail}")
