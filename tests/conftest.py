"""Shared fixtures: every test runs in its own temporary working directory with W&B offline and silent."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightscale.run_dir import RUN_DIR_ENV

pytest_plugins = ["cluster.fixtures"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def isolated_run_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run in tmp_path (so ``runs/`` lands there) with W&B offline, silent and unable to reach a network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightscale"])  # LightningCLI compares its args with sys.argv
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    yield tmp_path
    # The CLI exports the run directory for the DDP processes it launches; do not leak it into the next test.
    os.environ.pop(RUN_DIR_ENV, None)


def run_cli(*args: str) -> int:
    """Run ``lightscale ARGS`` in this process; returns the exit code (0 when it returned normally)."""
    from lightscale.cli import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def run_dirs(root: Path = Path("runs")) -> list[Path]:
    """All run directories (``runs/<name>/<id>``) under root."""
    return sorted(p for p in root.glob("*/*") if p.is_dir()) if root.exists() else []


def python_cli(*args: str, env: dict | None = None, timeout: float = 600) -> "subprocess.CompletedProcess[str]":  # noqa: F821
    """Run ``python -m lightscale ARGS`` in a fresh process (for exit codes, stderr and DDP)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "lightscale", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
