"""Every package that modnet imports is declared in pyproject.toml.

Imports at module level need a core dependency; a package from an optional extra
may only be imported inside a function (lazily), where a missing extra is turned
into an error that names it.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ; the longest matching prefix wins
DISTRIBUTIONS = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "torch.utils.tensorboard": "tensorboard",
}


def distribution(module: str) -> str | None:
    """The distribution providing ``module``; None for the standard library and modnet."""
    top = module.split(".")[0]
    if top in sys.stdlib_module_names or top == "modnet":
        return None
    for prefix in sorted(DISTRIBUTIONS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return DISTRIBUTIONS[prefix]
    return top.replace("_", "-").lower()


def imports(path: Path):
    """``(module, lazy)`` for every absolute import in a file; lazy = inside a function."""
    tree = ast.parse(path.read_text())
    lazy = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lazy |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            yield name, id(node) in lazy


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {
        name: {requirement_name(r) for r in requirements}
        for name, requirements in project.get("optional-dependencies", {}).items()
        if name != "dev"
    }
    return core, extras


def test_distribution_names_map_import_names():
    assert distribution("PIL.Image") == "pillow"
    assert distribution("yaml") == "pyyaml"
    assert distribution("torch.utils.tensorboard.SummaryWriter") == "tensorboard"
    assert distribution("torch.nn") == "torch"
    assert distribution("json") is None and distribution("modnet.io") is None


def test_every_import_of_modnet_is_a_declared_dependency():
    core, extras = declared()
    optional = set().union(*extras.values()) if extras else set()
    undeclared, eager_extras = [], []
    for path in sorted((ROOT / "modnet").rglob("*.py")):
        for module, lazy in imports(path):
            name = distribution(module)
            if name is None or name in core:
                continue
            where = f"{path.relative_to(ROOT)}: {module} ({name})"
            if name in optional:
                if not lazy:
                    eager_extras.append(where)
            else:
                undeclared.append(where)
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)
    assert not eager_extras, "optional extras imported at module level:\n" + "\n".join(eager_extras)


def test_the_scan_sees_the_imports_it_must_judge():
    found = {m for p in (ROOT / "modnet").rglob("*.py") for m, _ in imports(p)}
    for module in ("torch", "timm", "safetensors.torch", "tqdm.auto", "yaml"):
        assert any(m == module or m.startswith(module + ".") for m in found), module
    lazy = {m for m, lazy in imports(ROOT / "modnet/train/tracking.py") if lazy}
    assert "torch.utils.tensorboard" in lazy
