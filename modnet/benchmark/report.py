"""Printing and writing measurements: progress on stderr, summary lines, CSV/JSON rows."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..io.fs import atomic_write_text


def progress_printer(label: str, stream=None) -> Callable[[int, int], None]:
    """A one-line progress counter on stderr for long measurements."""
    stream = stream or sys.stderr
    live = hasattr(stream, "isatty") and stream.isatty()

    def report(done: int, total: int) -> None:
        if live:
            end = "\n" if done == total else ""
            print(f"\r{label}: round {done}/{total}", end=end, file=stream, flush=True)
        elif done == total:
            print(
                f"{label}: {total} round{'' if total == 1 else 's'} done", file=stream, flush=True
            )

    return report


def summary_line(row: dict[str, Any]) -> str:
    line = (
        f"{row['model']} {row['bench']} batch {row['batch_size']}: "
        f"{row['samples_per_sec']:.1f} samples/s, {row['gmacs']:.3f} GMACs/sample, "
        f"{row['flops_utilization']:.1%} of matmul peak"
    )
    if "peak_memory_mib" in row:
        peak = row["peak_memory_mib"]
        line += ", peak memory n/a (compiled)" if peak is None else f", peak {peak:.1f} MiB"
    if "ratio" in row:
        line += (
            f"\n  modnet/{row['baseline']} throughput ratio {row['ratio']:.3f} "
            f"(IQR {row['ratio_low']:.3f}-{row['ratio_high']:.3f}); "
            f"{row['baseline']}: {row['baseline_samples_per_sec']:.1f} samples/s"
        )
        if row.get("memory_ratio") is not None:
            line += f"; peak memory ratio {row['memory_ratio']:.3f}"
    return line


def format_results(rows: Sequence[dict[str, Any]], suffix: str) -> str:
    """``rows`` as the text of a results file: JSON for ``.json``, else CSV (the
    columns in order of first appearance; a field a row lacks is left empty)."""
    if suffix.lower() == ".json":
        return json.dumps(list(rows), indent=2) + "\n"
    fields: list[str] = []
    for row in rows:
        fields += [key for key in row if key not in fields]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Writes ``rows`` as CSV or JSON (by ``path``'s suffix), atomically: a crash or a
    full disk leaves any earlier file whole.

    Raises:
        DiskFullError: The device is full (the message names ``path``).
    """
    path = Path(path)
    atomic_write_text(path, format_results(rows, path.suffix))


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (tiny models stay non-zero)."""
    return float(f"{value:.{digits}g}")
