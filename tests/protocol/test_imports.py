"""The import graph: the protocol and the pure math below it never reach models, data, engines or the CLI.

Every file is parsed with ``ast`` (imports inside functions and relative imports included, resolved against
the file's own package), and the checker itself is tested on small sources it must flag and must pass.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
CHECKED = ["fedlora/protocol", "fedlora/aggregators", "fedlora/lowrank.py", "fedlora/dense_svd.py",
           "fedlora/types.py"]
FORBIDDEN = (
    "fedlora.sim", "fedlora.cli", "fedlora.data", "fedlora.partition", "fedlora.adapters", "fedlora.export",
    "fedlora.report", "fedlora.config", "transformers", "peft", "flwr",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of everything ``source`` (the code of ``module``) imports, at any depth."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)  # `from .. import sim`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.add(node.args[0].value)
    return names


def forbidden_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    return sorted(
        name for name in imported_names(source, module, is_package)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    )


def checked_files() -> list[Path]:
    files = []
    for entry in CHECKED:
        path = SRC / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_checked_files_exist():
    names = {module_name(p) for p in checked_files()}
    assert {"fedlora.protocol", "fedlora.protocol.messages", "fedlora.protocol.history", "fedlora.lowrank",
            "fedlora.types", "fedlora.aggregators.base"} <= names


@pytest.mark.parametrize("path", checked_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_forbidden_imports(path):
    found = forbidden_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert not found, f"{path.relative_to(SRC)} imports {found}"


@pytest.mark.parametrize("source", [
    "import transformers",
    "from peft import LoraConfig",
    "import flwr.client as fc",
    "from ..sim import engine",
    "from ..sim.engine import Simulation",
    "from .. import sim",
    "from .. import lowrank, cli",
    "from fedlora import config",
    "import fedlora.data.glue",
    "def f():\n    from ..report import MetricsWriter\n",
    "import importlib\nimportlib.import_module('fedlora.adapters')",
    "__import__('transformers')",
    "from ..partition.dirichlet import Dirichlet",
    "from ..export import export_adapter",
    "if TYPE_CHECKING:\n    from ..config import RunConfig\n",
])
def test_checker_flags(source):
    assert forbidden_imports(source, "fedlora.protocol.messages")


@pytest.mark.parametrize("source", [
    "import torch\nfrom safetensors.torch import save",
    "from .. import lowrank",
    "from ..types import LowRank",
    "from ..aggregators import get_aggregator",
    "from . import messages",
    "from .simulate import x",  # fedlora.protocol.simulate, not fedlora.sim
    "import peft_like",
    "import fedlora.simple",
])
def test_checker_passes(source):
    assert forbidden_imports(source, "fedlora.protocol.messages") == []


def test_relative_imports_resolve_from_a_package_init():
    # In fedlora/protocol/__init__.py, `from .. import sim` is fedlora.sim and `from . import sim` is not.
    assert forbidden_imports("from .. import sim", "fedlora.protocol", is_package=True) == ["fedlora.sim"]
    assert forbidden_imports("from . import sim", "fedlora.protocol", is_package=True) == []


def test_importing_the_protocol_loads_none_of_them():
    code = (
        "import sys, fedlora.protocol\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- layers: nothing imports backwards
# Data flows one way (config -> data and partition -> runtime -> client training -> aggregation -> metrics
# and checkpoints); the code's layers, lowest first. A module may import its own layer or lower ones.
LAYERS = [
    ["fedlora.types", "fedlora.seeds", "fedlora.atomic", "fedlora.devices", "fedlora.flops", "fedlora.hier"],
    ["fedlora.lowrank", "fedlora.dense_svd"],
    ["fedlora.aggregators", "fedlora.privacy"],
    ["fedlora.protocol"],
    ["fedlora.partition"],  # its registry's signatures define the config's partition options
    ["fedlora.config"],
    ["fedlora.data", "fedlora.checkpoint", "fedlora.runlog", "fedlora.sweep"],
    ["fedlora.report", "fedlora.report_plots", "fedlora.report_costs", "fedlora.report_dir",
     "fedlora.report_dir_plots"],
    ["fedlora.adapters"],
    ["fedlora.sim"],
    ["fedlora.flower"],  # the only package that imports flwr
    ["fedlora.export"],
    ["fedlora.cli", "fedlora.cli_flower", "fedlora.cli_results", "fedlora.cli_workers", "fedlora.cli_inspect"],
]


def layer_of(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def backward_imports(path: Path) -> list[str]:
    module = module_name(path)
    own = layer_of(module)
    names = imported_names(path.read_text(), module, path.name == "__init__.py")
    return sorted(n for n in names if n.startswith("fedlora") and (layer_of(n) or 0) > own)


ALL_FILES = sorted(p for p in (SRC / "fedlora").rglob("*.py") if p != SRC / "fedlora" / "__init__.py")


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_every_module_has_a_layer_and_imports_only_downward(path):
    assert layer_of(module_name(path)) is not None, f"{module_name(path)}: add it to LAYERS"
    assert backward_imports(path) == [], f"{module_name(path)} imports a higher layer"


def test_the_layer_check_flags_a_backward_import(tmp_path):
    fake = SRC / "fedlora" / "config.py"  # a real name (layer 4), fake code importing the engine
    names = imported_names("from .sim.engine import Simulation\n", module_name(fake))
    assert any(layer_of(n) > layer_of("fedlora.config") for n in names)


def test_only_fedlora_flower_imports_flwr():
    importers = [module_name(p) for p in ALL_FILES
                 if any(n == "flwr" or n.startswith("flwr.")
                        for n in imported_names(p.read_text(), module_name(p), p.name == "__init__.py"))]
    assert all(m == "fedlora.flower" or m.startswith("fedlora.flower.") for m in importers), importers
