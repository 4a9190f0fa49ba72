"""Interleaved timing: ratios of workloads measured in the same alternating rounds.

The sides run in alternating rounds (the order rotates every round), and a
ratio is the median of the per-round ratios, so slow drift on a shared machine
cancels out, which a ratio of two separate runs would not do.
"""

from __future__ import annotations

import math
import operator
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .workloads import Workload, synchronize


class Interleaver:
    """Times several workloads in alternating rounds.

    Every round times each workload for a fixed number of steps, chosen after
    warm-up so one measurement lasts about ``min_time`` seconds; the order of the
    workloads rotates every round. Ratios are taken round by round, then the median
    is reported, so a machine that slows down for a while slows both sides.

    Args:
        workloads: Name to workload.
        min_time: Seconds each workload runs per round (at least one step).
        warmup: Steps run before timing (compilation happens here).
    """

    def __init__(self, workloads: Mapping[str, Workload], min_time: float = 0.1, warmup: int = 2):
        if not workloads:
            raise ValueError("nothing to time: give at least one workload")
        self.workloads = dict(workloads)
        self.min_time = min_time
        self.warmup_steps = warmup
        self.steps: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {name: [] for name in self.workloads}
        self._rounds = 0

    def warmup(self) -> None:
        """Runs the warm-up steps and picks how many steps make one measurement."""
        for name, workload in self.workloads.items():
            for _ in range(self.warmup_steps):
                workload.step()
            once = self._time(workload, 1)
            self.steps[name] = max(1, math.ceil(self.min_time / max(once, 1e-9)))

    def round(self) -> None:
        """One measurement of every workload, in this round's order."""
        if not self.steps:
            self.warmup()
        names = list(self.workloads)
        shift = self._rounds % len(names)
        for name in names[shift:] + names[:shift]:
            steps = self.steps[name]
            self.seconds[name].append(self._time(self.workloads[name], steps) / steps)
        self._rounds += 1

    def run(self, rounds: int, progress: Callable[[int, int], None] | None = None) -> Interleaver:
        """Warm-up, then ``rounds`` rounds."""
        if not self.steps:
            self.warmup()
        for index in range(rounds):
            self.round()
            if progress is not None:
                progress(index + 1, rounds)
        return self

    @property
    def rounds(self) -> int:
        return self._rounds

    def step_time(self, name: str) -> float:
        """Median seconds per step."""
        return statistics.median(self._timed(name))

    def samples_per_sec(self, name: str) -> float:
        return self.workloads[name].batch_size / self.step_time(name)

    def ratios(
        self, subject: str, baseline: str, work: Mapping[str, float] | None = None
    ) -> list[float]:
        """Per-round rate ratios, ``subject / baseline`` (above 1: subject faster).

        Args:
            work: What one step of each side does (e.g. its FLOPs); default: its
                batch size, so the ratio is one of samples/s.
        """
        units = {name: self.workloads[name].batch_size for name in (subject, baseline)}
        units.update(work or {})
        return [
            (units[subject] / s) / (units[baseline] / b)
            for s, b in zip(self._timed(subject), self._timed(baseline), strict=True)
        ]

    def ratio(self, subject: str, baseline: str, work: Mapping[str, float] | None = None) -> Ratio:
        """The median per-round ratio (see ``ratios``) and its quartiles."""
        return Ratio.of(self.ratios(subject, baseline, work))

    def _timed(self, name: str) -> list[float]:
        if not self.seconds[name]:
            raise RuntimeError("no round has been timed yet: call run() or round() first")
        return self.seconds[name]

    @staticmethod
    def _time(workload: Workload, steps: int) -> float:
        synchronize(workload.device)
        start = time.perf_counter()
        for _ in range(steps):
            workload.step()
        synchronize(workload.device)
        return time.perf_counter() - start


@dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios, with the quartiles that say how noisy it was."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Ratio:
        """The median and quartiles of ``values`` (one value: all three are it).

        Raises:
            ValueError: ``values`` is empty (no round was timed).
        """
        if not values:
            raise ValueError("no ratios to summarise: time at least one round first")
        if len(values) < 2:
            value = values[0]
            return cls(value, value, value, len(values))
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, len(values))

    def __str__(self) -> str:
        return f"{self.median:.3f} (IQR {self.low:.3f}-{self.high:.3f}, {self.rounds} rounds)"


@dataclass(frozen=True)
class Target:
    """What the design promises for a ratio, e.g. ``Target(">=", 0.97)``."""

    op: str
    value: float

    def __post_init__(self):
        if self.op not in _COMPARISONS:
            raise ValueError(f"unknown comparison {self.op!r}: use one of {list(_COMPARISONS)}")

    def met(self, measured: float) -> bool:
        return _COMPARISONS[self.op](measured, self.value)

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


_COMPARISONS = {">=": operator.ge, "<=": operator.le}
