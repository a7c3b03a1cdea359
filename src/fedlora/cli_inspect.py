"""``fedlora verify`` and ``fedlora methods``: look at a run's checkpoints, and at the methods there are.

    fedlora verify RUN_DIR
    fedlora methods
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .cli import USER_ERRORS, _fail, _stdout


def register_commands(app: typer.Typer) -> None:
    app.command()(verify)
    app.command("methods")(list_methods)


def verify(run_dir: Annotated[str, typer.Argument(help="a run folder (with checkpoints/)")]) -> None:
    """Check every round's checkpoint files against their recorded sizes and SHA-256."""
    from rich.table import Table

    from . import checkpoint

    path = Path(run_dir)
    try:
        if not path.is_dir():
            raise ValueError(f"{path}: no such run folder")
        checks = checkpoint.verify_run(path)
        if not checks:
            raise ValueError(f"{path}: no checkpoint (no checkpoints/round_NNNN folder)")
    except USER_ERRORS as err:
        _fail(err)
    usable = checkpoint.newest_usable(checks)
    table = Table("round", "status", "detail", title=f"fedlora verify: {path}")
    for c in checks:
        detail = "; ".join(f"{name}: {why}" for name, why in c.problems.items())
        table.add_row(str(c.number), "intact" if c.intact else "[red]damaged[/]", detail or "all files match")
    _stdout().print(table)
    damaged = [c for c in checks if not c.intact]
    if damaged:
        first = damaged[0]
        _fail(ValueError(f"round {first.number} is damaged ({first.summary()}); newest usable round: "
                         f"{usable if usable is not None else 'none'}"))
    _stdout().print(f"all {len(checks)} rounds intact")


def list_methods() -> None:
    """List the aggregation methods and their options."""
    from rich.table import Table

    from .aggregators import AGGREGATORS, method_options
    from .protocol import hierfedlora

    table = Table("method", "exact", "options", "summary")
    rows = [(name, "yes" if cls.exact else "no", method_options(name), sys.modules[cls.__module__])
            for name, cls in AGGREGATORS.items()]
    rows.append((hierfedlora.HierFedLoRA.name, "as its rules", hierfedlora.OPTIONS, hierfedlora))
    for name, exact, options, module in sorted(rows, key=lambda row: row[0]):
        doc = (module.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, exact, ", ".join(f"{k}={v!r}" for k, v in options.items()), doc)
    _stdout().print(table)
