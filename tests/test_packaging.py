"""The package declares exactly the third-party distributions it imports: no undeclared import that breaks a
fresh install, no declared dependency it never uses (the examples' Hydra and TensorBoard live in an extra)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# distribution name -> the top-level module it installs, where the two differ
IMPORT_NAMES = {"hydra-core": "hydra", "scikit-learn": "sklearn"}


def _imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "lightning_gradstab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "lightning_gradstab"}


def _declared(requirements: list[str]) -> set[str]:
    names = {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0] for requirement in requirements}
    return {IMPORT_NAMES.get(name, name.replace("-", "_")) for name in names}


def test_the_declared_dependencies_are_exactly_the_third_party_modules_the_package_imports() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _declared(project["dependencies"]) == _imported_top_level_modules()


def test_the_package_ships_its_type_hints() -> None:
    assert (ROOT / "lightning_gradstab" / "py.typed").is_file()
