"""A real single-machine SLURM cluster (slurmctld + slurmd n1, n2) for tests marked ``slurm``.

Real daemons catch what mocks of ``SLURM_*`` variables cannot: signal delivery to steps, ``scontrol requeue``,
``SLURM_RESTART_COUNT``, ``sbatch --wait`` across requeues. The shell scripts next to this file do the work
so the same cluster can be started by hand (``make slurm-up``) for debugging.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent
SLURM_UP = SCRIPTS_DIR / "slurm_up.sh"
SLURM_DOWN = SCRIPTS_DIR / "slurm_down.sh"
DEFAULT_STATE_DIR = Path(os.environ.get("LIGHTSCALE_SLURM_STATE_DIR", "/tmp/lightscale-slurm"))
UP_TIMEOUT_S = 600  # includes a first-time apt-get install


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running test cluster; pass ``env`` to every ``sbatch`` / ``squeue`` / ``scancel``."""

    state_dir: Path
    conf: Path
    env: dict[str, str]
    nodes: tuple[str, ...] = ("n1", "n2")
    partition: str = "debug"


def _clean_env(conf: Path) -> dict[str, str]:
    """The test process's environment minus any ``SLURM_*`` it inherited (e.g. pytest itself running in a
    real allocation), plus ``SLURM_CONF`` pointing at the test cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    return env


def _down(state_dir: Path) -> None:
    subprocess.run(["bash", str(SLURM_DOWN), str(state_dir)], capture_output=True, check=False, timeout=120)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the cluster once per session (skip if impossible here) and stop it at the end, even on failure.

    A cluster that was already running before the session (``make slurm-up``) is used and left running.
    """
    state_dir = DEFAULT_STATE_DIR
    try:
        proc = subprocess.run(
            ["bash", str(SLURM_UP), str(state_dir)],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        _down(state_dir)
        pytest.skip(f"cannot start a SLURM test cluster: {err}")
    if proc.returncode != 0:
        _down(state_dir)
        why = _tail(proc.stderr)
        pytest.skip(f"cannot start a SLURM test cluster (slurm_up.sh exit {proc.returncode}):\n{why}")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("export SLURM_CONF="), proc.stdout
    conf = Path(last.split("=", 1)[1])
    started_here = "already up" not in proc.stderr
    try:
        yield SlurmCluster(state_dir=state_dir, conf=conf, env=_clean_env(conf))
    finally:
        if started_here:
            _down(state_dir)


def squeue_state(job_id: str, env: Mapping[str, str]) -> str | None:
    """The job's state (``PENDING``, ``RUNNING``, ...), or ``None`` once Slurm no longer lists it."""
    out = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%T"], env=dict(env), capture_output=True, text=True, check=False
    ).stdout.strip()
    return out or None


def sbatch_wait(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120,
    *,
    options: Sequence[str] = (),
) -> tuple[str, int]:
    """Submit ``script args`` with ``sbatch --parsable --wait`` and block until the job is finished.

    Returns ``(job_id, returncode)``; the return code is the job's exit code, and ``--wait`` follows the job
    across requeues. On timeout the job is cancelled and ``TimeoutError`` raised, so no job outlives a test.
    """
    cmd = ["sbatch", "--parsable", "--wait", *options, os.fspath(script), *args]
    env = dict(os.environ if env is None else env)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        job_id = out.strip().splitlines()[0].split(";")[0] if out.strip() else ""
        if job_id:
            subprocess.run(["scancel", job_id], env=env, check=False)
        raise TimeoutError(f"job {job_id or '?'} ({script}) did not finish within {timeout} s") from None
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"sbatch printed no job id (exit {proc.returncode}): {err.strip()}")
    return lines[0].split(";")[0], proc.returncode
