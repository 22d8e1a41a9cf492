"""The house keeps its plan: each part imports only the layers below it, no module changes global state when it is
imported, and no source file grows past what one reading can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "lightscale"
# part -> the parts it may import (besides itself); see the README's layout
ALLOWED = {
    "core": set(),
    "nets": set(),
    "schedules": set(),
    "contract": {"core"},
    "cluster": {"core"},
    "resilience": {"core", "cluster"},
    "training": {"core", "resilience"},
    "tracking": {"core", "cluster", "contract"},
    "data": {"core", "resilience"},
    "models": {"core", "nets", "training", "schedules", "contract"},
    "callbacks": {"resilience", "tracking", "training"},
    "loggers": {"tracking"},
    "report": {"core"},
    "cli": {"core", "cluster", "resilience", "training", "tracking", "contract", "report", "callbacks", "loggers"},
    "__init__": set(),
    "__main__": set(),  # dispatches by module name (importlib), so that `lightscale report` loads no Lightning
}
MAX_LINES = 400


def part_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_parts(path: Path) -> dict[str, int]:
    """lightscale parts a module imports (also inside functions), with the line of the first import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "lightscale" and len(parts) > 1 and parts[1] != "__version__":
                found.setdefault(parts[1], node.lineno)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_each_module_imports_only_the_layers_below_it(path: Path) -> None:
    part = part_of(path)
    assert part in ALLOWED, f"{part} is a new part of lightscale: give it a place in ALLOWED and the README"
    wrong = {p: line for p, line in imported_parts(path).items() if p != part and p not in ALLOWED[part]}
    assert not wrong, f"{path.relative_to(PACKAGE)} ({part}) imports {wrong} (part: line); allowed: {ALLOWED[part]}"


def test_the_layers_have_no_cycles() -> None:
    def reaches(start: str, seen: set[str]) -> set[str]:
        for nxt in ALLOWED[start] - seen:
            seen |= {nxt} | reaches(nxt, seen | {nxt})
        return seen

    assert all(part not in reaches(part, set()) for part in ALLOWED)


def test_no_source_file_is_longer_than_one_reading() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"


def test_importing_lightscale_changes_no_global_state() -> None:
    """Warning filters, logging filters, YAML representers, signal handlers, environment and torch settings are
    the same before and after importing every module (the CLI changes what it needs when it runs)."""
    script = r"""
import importlib, logging, os, pkgutil, signal, warnings, yaml, torch
def snapshot():
    return (
        list(warnings.filters),
        {n: list(f) for n in list(logging.root.manager.loggerDict) if (f := logging.getLogger(n).filters)},
        dict(yaml.SafeDumper.yaml_multi_representers), dict(yaml.SafeDumper.yaml_representers),
        {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)},
        dict(os.environ), torch.get_float32_matmul_precision(), torch.get_default_dtype(),
    )
import lightning, lightning.pytorch, jsonargparse, wandb  # their own import-time changes are not ours
before = snapshot()
import lightscale
for module in pkgutil.walk_packages(lightscale.__path__, "lightscale."):
    if not module.name.endswith("__main__"):
        importlib.import_module(module.name)
after = snapshot()
names = ["warnings.filters", "logging filters", "yaml multi-representers", "yaml representers", "signal handlers",
         "os.environ", "float32 matmul precision", "default dtype"]
changed = [name for name, a, b in zip(names, before, after) if a != b]
print("changed:", changed)
raise SystemExit(1 if changed else 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
