"""The README's Python examples run as written, top to bottom, like a notebook."""

import re
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: trains real runs (python -m pytest -m slow)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run_in_order(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(blocks):
        exec(compile(textwrap.dedent(block), f"README.md[python block {index}]", "exec"), namespace)
