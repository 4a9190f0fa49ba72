"""The README's first two command lines: one trains, one tests, the same test line as CI."""

import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import _share_the_cores_between_workers

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def front_door() -> list[str]:
    """The lines of the README's first code block, after the title and one paragraph."""
    match = re.match(r"# [^\n]+\n\n((?:[^\n]+\n)+)\n```\n(.*?)```\n", README, flags=re.S)
    assert match, "the README starts with a title, one paragraph, then a code block"
    return match.group(2).strip().splitlines()


def pytest_arguments(line: str) -> list[str]:
    words = shlex.split(line.split("&&")[-1] if "&&" in line else line)
    start = next(i for i, w in enumerate(words) if w == "pytest")
    return words[start + 1 :]


def test_the_readme_opens_with_exactly_two_command_lines():
    train_line, test_line = front_door()
    assert "pip install -e ." in train_line and train_line.endswith("&& modnet train")
    assert 'pip install -e ".[dev]"' in test_line and "python -m pytest" in test_line
    after = README.split(test_line, 1)[1]
    assert re.search(r"about\s+\d+\s+minutes\s+on\s+2\s+CPU\s+cores", after[:400])
    assert "accuracy" in after[:900] and "run directory: runs/train" in after[:900]


def test_ci_runs_the_readme_test_line():
    ci = (ROOT / ".ci" / "run").read_text()
    (ci_line,) = [line for line in ci.splitlines() if "-m pytest" in line]
    _, test_line = front_door()
    assert pytest_arguments(ci_line.rstrip(" |{")) == pytest_arguments(test_line)
    assert "set -euo pipefail" in ci and '"$status" -eq 5' in ci


def test_the_default_run_is_the_fast_tier_and_the_readme_line_runs_both():
    tomllib = pytest.importorskip("tomllib")
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    options = options["ini_options"]
    assert "-m 'not slow'" in options["addopts"]
    assert any(marker.startswith("slow:") for marker in options["markers"])
    _, test_line = front_door()
    assert pytest_arguments(test_line) == ["-n", "auto", "-m", "slow or not slow"]


def test_xdist_workers_each_get_their_share_of_the_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(7)), raising=False)
    try:
        _share_the_cores_between_workers()
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "9")
        _share_the_cores_between_workers()
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
