"""One directory per run, shared by every rank of that run.

The directory is decided once, before any process of the run starts training: a new, unique
``<root>/<name>/<YYYYmmdd-HHMMSS>-<hex>`` for a fresh run, or the one named explicitly. It is exported in
``LIGHTSCALE_RUN_DIR`` so the processes Lightning launches for DDP (which re-run the same command line)
and restarted SLURM jobs land in the same place instead of inventing their own.
"""

import os
import secrets
import time
from pathlib import Path

RUN_DIR_ENV = "LIGHTSCALE_RUN_DIR"


def new_run_dir(root: str, name: str) -> Path:
    """A fresh, unique run directory path (not created yet)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while True:
        path = Path(root) / name / f"{stamp}-{secrets.token_hex(3)}"
        if not path.exists():
            return path


def shared_job_id() -> str | None:
    """An id that every rank of an externally launched multi-process job sees alike, if there is one.

    ``srun`` and ``torchrun`` start all ranks independently, so they cannot agree on a random name; they can
    agree on the job id (SLURM) or the rendezvous id (torchrun).
    """
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{job}_{task}" if job and task else f"slurm-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"torchrun-{run_id}"
    return None


def resolve_run_dir(root: str, name: str, explicit: str | None) -> tuple[Path, bool]:
    """Return ``(run_dir, inherited)``; ``inherited`` is True when the directory was chosen by a parent
    process or the job (environment) rather than by this command line."""
    if explicit:
        return Path(explicit), False
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]), True
    job_id = shared_job_id()
    if job_id:
        return Path(root) / name / job_id, True
    return new_run_dir(root, name), False


def has_run_artifacts(run_dir: Path) -> bool:
    """True when ``run_dir`` already holds results that a new run must not overwrite."""
    return run_dir.is_dir() and any(run_dir.iterdir())
