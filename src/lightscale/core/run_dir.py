"""One directory per run, shared by every rank of that run, owned by one run at a time.

The directory is decided once, before any process of the run starts training: a new, unique
``<root>/<name>/<YYYYmmdd-HHMMSS>-<tag>`` (:func:`run_dir_name`; the tag is random, or ``slurm<job>`` for a SLURM
job), one every rank of an externally launched job derives alike (``slurm-<job>``, ``torchrun-<id>``), or the one
named explicitly. While a run is in it, the CLI exports it in ``LIGHTSCALE_RUN_DIR`` so the processes Lightning
launches for DDP (which re-run the same command line) land in the same place; ``slurm/train.sbatch`` exports it
for every task and every restart of a job. The run's first process holds :class:`RunLock` on it, so a second
writer fails at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from lightscale.core.errors import UserError
from lightscale.core.files import write_atomic

RUN_DIR_ENV = "LIGHTSCALE_RUN_DIR"
LOCK_FILE = ".lock"
SUMMARY_FILE = "summary.json"
WANDB_RUN_ID_FILE = "wandb-run-id"  # the W&B run a directory continues (written by the logger or a sweep agent)
DIAGNOSTICS_DIR = "diagnostics"  # heartbeats, stacks, memory snapshots: what to look at when a run goes wrong
WANDB_FINISHED_MARKER = ".lightscale-finished"  # in an offline-run-* folder: its process closed the W&B run
RUN_DIR_NAME = re.compile(r"(?P<stamp>\d{8}-\d{6})-(?P<tag>[\w.-]+)")
# Files that say where and how a run started, written before it trains (by the CLI or slurm/train.sbatch):
# they do not make a directory "hold a run".
# A W&B run id chosen by a sweep agent for the run to come is one of them too.
BOOKKEEPING = re.compile(rf"^(\.lock|slurm-starts\.jsonl|slurm-.*\.out|{WANDB_RUN_ID_FILE})$")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]*")


def check_run_name(name: str) -> None:
    """``run.name`` is one or more plain folder names below ``run.root``: it cannot climb out of it."""
    parts = name.split("/")
    if not all(_NAME.fullmatch(part) and part not in (".", "..") for part in parts):
        raise UserError(
            f"run.name {name!r}: use letters, digits and . _ - + = (and / for sub-folders); it names a folder "
            "under run.root and cannot be absolute or contain '..'"
        )


def run_dir_name(tag: str | None = None) -> str:
    """``<YYYYmmdd-HHMMSS>-<tag>``: sorts by start time; the tag (random by default) keeps it unique."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{tag or secrets.token_hex(3)}"


def run_label(path: Path) -> str:
    """A short name for a run in a comparison: the tag of :func:`run_dir_name`, else the folder name."""
    match = RUN_DIR_NAME.fullmatch(path.name)
    return match.group("tag") if match else path.name


def new_run_dir(root: str, name: str, tag: str | None = None) -> Path:
    """A fresh, unique run directory path (not created yet)."""
    while True:
        path = Path(root) / name / run_dir_name(tag)
        if not path.exists():
            return path
        tag = f"{tag}-{secrets.token_hex(2)}" if tag else None  # the same second and tag: another cluster


def resolve_run_dir(root: str, name: str, explicit: str | None, shared_id: str | None = None) -> Path:
    """The run directory: ``explicit`` (``run.dir``), else the one the launching process or job chose
    (``LIGHTSCALE_RUN_DIR``), else one named by ``shared_id`` (what every rank of an externally launched job
    sees alike, :func:`lightscale.cluster.slurm.launch_id`), else a new one."""
    if explicit:
        return Path(explicit)
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if shared_id:
        return Path(root) / name / shared_id
    return new_run_dir(root, name)


def has_run_artifacts(run_dir: Path) -> bool:
    """True when ``run_dir`` already holds results that a new run must not overwrite."""
    return run_dir.is_dir() and any(not BOOKKEEPING.match(p.name) for p in run_dir.iterdir())


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run wrote any checkpoint (a run with one is worth keeping, even when it failed)."""
    checkpoints = run_dir / "checkpoints"
    return any(run_dir.glob("hpc_ckpt_*")) or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def update_summary(run_dir: Path, fields: dict[str, Any]) -> None:
    """Merge ``fields`` into ``<run_dir>/summary.json`` (one process of a run writes it: global rank 0)."""
    path = run_dir / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        summary = {}
    summary.update(fields)
    write_atomic(path, json.dumps(summary, indent=2) + "\n")


class RunLock:
    """Exclusive ownership of a run directory: ``flock`` on ``<run_dir>/.lock``, taken by the run's first process.

    A second run into the same directory (two fits started with one ``--run.dir``, two resumes of one run, a
    notebook re-running a cell) fails at once with one line. The kernel releases the lock when its process ends,
    however it ends, so a run killed with ``kill -9`` never leaves a stale lock behind. The file stays, empty: a
    start never changes a byte of a run it is refused.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.created = False  # whether acquire() created the lock file
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(
                f"run directory {self.path.parent} is in use by another run (a live process holds {self.path}); "
                "wait for it to finish, or leave run.dir unset for a new run"
            ) from None
        self._fd = fd

    def release(self, remove: bool = False) -> None:
        """Unlock; ``remove`` deletes the lock file too (a refused start leaves a directory as it found it)."""
        if self._fd is not None:
            if remove:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None


def mark_wandb_run_finished(wandb_dir: str | Path) -> None:
    """Leave :data:`WANDB_FINISHED_MARKER` in an offline W&B run's folder (``offline-run-*``, the parent of the W&B
    run's ``dir``) once its process has closed it: ``lightscale sync --watch`` then uploads it a last time."""
    folder = Path(wandb_dir)
    folder = folder.parent if folder.name == "files" else folder
    if folder.name.startswith("offline-run-") and folder.is_dir():
        (folder / WANDB_FINISHED_MARKER).touch()
