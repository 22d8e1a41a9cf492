"""Shared fixtures: every test runs in its own temporary working directory with W&B offline and silent."""

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightscale.core.run_dir import RUN_DIR_ENV

pytest_plugins = ["cluster.fixtures"]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# experiment x preset -> subcommand -> outcome, filled by test_matrix.py and printed at the end of the session
MATRIX: dict[tuple[str, str], dict[str, str]] = {}


@pytest.fixture(autouse=True, scope="session")
def shared_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One torch.compile cache for the session: the first compilation of a module is slow, the rest reuse it."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous or str(tmp_path_factory.mktemp("inductor"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The preset matrix (experiment x preset -> each subcommand's outcome), when test_matrix.py ran."""
    if not MATRIX:
        return
    write = terminalreporter.write_line
    terminalreporter.section("experiment x preset x subcommand")
    commands = ("fit", "validate", "test", "predict", "refit")
    width = max(len(f"{e} {p}") for e, p in MATRIX) + 2
    write(f"{'experiment  preset':<{width}}" + "".join(f"{c:<12}" for c in commands))
    for (experiment, preset), outcome in sorted(MATRIX.items()):
        cells = [outcome.get(c, "FAILED") for c in commands]
        short = ["ok" if c == "passed" else "refused" if c.startswith("refused") else c[:11] for c in cells]
        write(f"{experiment + '  ' + preset:<{width}}" + "".join(f"{c:<12}" for c in short))
    notes = sorted({c for outcome in MATRIX.values() for c in outcome.values() if c not in ("passed",)})
    for note in notes:
        write(f"  {note}")


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
    from lightscale.__main__ import main

    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1
    return 0


def without_logging_noise(stderr: str) -> list[str]:
    """Lines of stderr minus pytest artefacts: a log handler that an earlier in-process run bound to that test's
    (since closed) capture stream prints a '--- Logging error ---' block when Lightning logs 'Seed set to 42'."""
    lines, skipping = [], False
    for line in stderr.strip().splitlines():
        skipping = skipping or line == "--- Logging error ---"
        if not skipping and not line.startswith("INFO: "):
            lines.append(line)
        skipping = skipping and not line.startswith("Arguments: ")
    return lines


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


def launcher_env() -> dict[str, str]:
    """Environment of a process that starts its own process group (torchrun, Lightning's launcher): nothing of this
    process's SLURM / torchrun world or W&B service, the test helpers importable, one thread per rank."""
    drop = ("SLURM_", "TORCHELASTIC_", "MASTER_", "WANDB_SERVICE", RUN_DIR_ENV)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**clean, "PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous on 127.0.0.1)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_together(cwd: Path, *commands: list[str], timeout: float = 600) -> None:
    """Start ``commands`` together (e.g. the torchrun agents of one job on several "nodes") in ``cwd`` with
    :func:`launcher_env`, wait for all of them, and fail with their output unless every one exits 0."""
    import subprocess

    cwd.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            command, cwd=cwd, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in commands
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-4000:] for o in outputs)
