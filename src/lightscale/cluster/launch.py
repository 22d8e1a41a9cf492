"""How this process was started: alone, by Lightning's own DDP launcher, by ``torchrun``, or by ``srun``.

``srun`` and ``torchrun`` start every rank independently: the ranks learn their place from the environment, agree
on a run directory through :func:`launch_id`, and must be as many as ``trainer.devices x trainer.num_nodes``
(checked by the CLI through :func:`launcher_world_size`)."""

from __future__ import annotations

import os

from lightscale.cluster.slurm import job_key
from lightscale.core.errors import UserError

INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning ignores SLURM in such jobs


def _env(env: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ if env is None else env)


def launch_id(env: dict[str, str] | None = None) -> str | None:
    """A name every rank of an externally launched multi-process job derives alike (``slurm-<job>``,
    ``torchrun-<rendezvous id>``), or ``None``: they cannot agree on a random one."""
    env = _env(env)
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS") or 1) > 1:
        return f"slurm-{job_key(env)}"
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none" and int(env.get("WORLD_SIZE") or 1) > 1:
        return f"torchrun-{run_id}"
    return None


def externally_launched(env: dict[str, str] | None = None) -> bool:
    """Whether SLURM (``srun`` with several tasks) or torchrun started this process as one of several ranks."""
    env = _env(env)
    return int(env.get("SLURM_NTASKS") or 1) > 1 or "TORCHELASTIC_RUN_ID" in env


def launcher_world_size(env: dict[str, str] | None = None) -> tuple[str, int] | None:
    """``(launcher, processes)`` when torchrun or srun started this process as one of several, else ``None``."""
    env = _env(env)
    if "TORCHELASTIC_RUN_ID" in env and env.get("WORLD_SIZE", "").isdigit():
        return "torchrun", int(env["WORLD_SIZE"])
    under_srun = env.get("SLURM_STEP_ID") is not None and int(env.get("SLURM_NTASKS") or 1) > 1
    if under_srun and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES:
        return "srun", int(env["SLURM_NTASKS"])
    return None


def check_srun(env: dict[str, str] | None = None) -> None:
    """Refuse to train in a multi-task allocation from a process that ``srun`` did not start.

    ``sbatch --ntasks-per-node=4`` followed by a bare ``lightscale fit`` runs one process that believes it
    is rank 0 of 4 and waits for the other three until the collective timeout (30 minutes); fail at once.
    """
    env = _env(env)
    if not env.get("SLURM_JOB_ID") or env.get("SLURM_STEP_ID") is not None or env.get("SLURM_STEPID") is not None:
        return
    if env.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        return
    ntasks = int(env.get("SLURM_NTASKS") or 1)
    if ntasks > 1:
        raise UserError(
            f"this SLURM job has {ntasks} tasks but lightscale was not started by srun, so it would wait forever "
            "for the other ranks: launch it as `srun lightscale fit ...` (slurm/train.sbatch does)"
        )
