"""SLURM jobs: who the job is, one run directory per job that survives requeues, and requeueing.

Used by ``slurm/train.sbatch`` and ``slurm/sweep.sbatch`` before they start the training step::

    RUN_DIR="$(python -m lightscale.cluster.slurm run-dir --config CONFIG [overrides])"
    export LIGHTSCALE_RUN_DIR="$RUN_DIR"
    srun lightscale fit --config CONFIG [overrides] ...

On the first start of a job (``SLURM_RESTART_COUNT`` unset or 0) a new, unique directory
``<run.root>/<run.name>/<YYYYmmdd-HHMMSS>-slurm<jobid>`` is chosen and recorded in
``.lightscale/slurm/<jobid>.rundir`` under the submit directory; a requeued start reads it back. Every task
of every start therefore writes into the same directory, and a resume looks only there: job ids restart at 1
when a cluster's state is reset, so a directory named by the job id alone could hold another job's
checkpoints. This module imports neither torch nor Lightning, so it costs milliseconds inside a job.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightscale.core.errors import UserError
from lightscale.core.files import write_atomic
from lightscale.core.run_dir import new_run_dir

RECORD_DIR = Path(".lightscale") / "slurm"
STARTS_FILE = "slurm-starts.jsonl"
REQUEUE_REASONS = ("TimeLimit", "Preempt")  # a SIGTERM for these requeues a job; for a plain scancel it does not
#: What a run records of the job it is part of (provenance) -> the job's environment variable.
JOB_VARIABLES = {
    "job_id": "SLURM_JOB_ID",
    "array_job_id": "SLURM_ARRAY_JOB_ID",
    "array_task_id": "SLURM_ARRAY_TASK_ID",
    "restart_count": "SLURM_RESTART_COUNT",
    "job_name": "SLURM_JOB_NAME",
    "partition": "SLURM_JOB_PARTITION",
    "nodelist": "SLURM_JOB_NODELIST",
    "num_nodes": "SLURM_JOB_NUM_NODES",
    "ntasks": "SLURM_NTASKS",
    "cluster": "SLURM_CLUSTER_NAME",
}


# --------------------------------------------------------------------------------------------- job identity
def job_key(env: dict[str, str] | None = None) -> str | None:
    """``<array job>_<task>`` for an array task, else the job id; ``None`` outside a SLURM job."""
    env = os.environ if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def restart_count(env: dict[str, str] | None = None) -> int:
    """How often SLURM has restarted this job (0 on the first start)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def job_info(env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The SLURM job this process runs in (``None`` outside SLURM); numbers as ints, for W&B filters."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None
    info: dict[str, Any] = {}
    for key, variable in JOB_VARIABLES.items():
        value = env.get(variable)
        if value is not None:
            info[key] = int(value) if value.isdigit() else value
    info.setdefault("restart_count", 0)  # SLURM sets it only once a job has been requeued
    return info


def record_path(key: str, submit_dir: Path | None = None) -> Path:
    base = Path(submit_dir or os.environ.get("SLURM_SUBMIT_DIR") or Path.cwd())
    return base / RECORD_DIR / f"{key}.rundir"


# ---------------------------------------------------------------------------- run name from the command line
def _option(args: Sequence[str], name: str) -> list[str]:
    """Every value given to ``--name`` (``--name V`` or ``--name=V``), in order."""
    values = []
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(name + "="):
            values.append(arg[len(name) + 1 :])
    return values


def _dig(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def run_location(args: Sequence[str]) -> tuple[str, str, str | None]:
    """``(run.root, run.name, run.dir)`` as ``lightscale fit ARGS`` would resolve them.

    A light re-implementation of the CLI's merge (``--config`` files in order, then overrides) for the three
    keys that place a run, so a batch script can name the directory without importing Lightning. Only the
    folder's grouping depends on it: the directory itself is handed to every task in ``LIGHTSCALE_RUN_DIR``.
    """
    root, name, run_dir, class_path = "runs", None, None, None
    for i, arg in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) and "=" not in arg else arg.partition("=")[2]
        key = arg.partition("=")[0]
        if key == "--config":
            path = Path(value)
            if not path.is_file():
                continue
            try:
                tree = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                continue
            tree = tree.get("fit", tree) if isinstance(tree, dict) else {}
            root = _dig(tree, "run", "root") or root
            name = _dig(tree, "run", "name") or name
            run_dir = _dig(tree, "run", "dir") or run_dir
            model = tree.get("model") if isinstance(tree, dict) else None
            class_path = (model if isinstance(model, str) else _dig(tree, "model", "class_path")) or class_path
        elif key == "--run.root":
            root = value
        elif key == "--run.name":
            name = value
        elif key == "--run.dir":
            run_dir = value
        elif key in ("--model", "--model.class_path"):
            class_path = value
    if not name:
        name = str(class_path).rsplit(".", 1)[-1].lower() if class_path else "run"
    return str(root), str(name), run_dir


# ----------------------------------------------------------------------------------------- the job's run dir
def job_run_dir(args: Sequence[str], env: dict[str, str] | None = None, submit_dir: Path | None = None) -> Path:
    """This job's run directory: recorded on the first start, read back on every restart (see module doc)."""
    env = dict(os.environ if env is None else env)
    key = job_key(env)
    if key is None:
        raise UserError("lightscale.cluster.slurm run-dir: not inside a SLURM job (no SLURM_JOB_ID)")
    record = record_path(key, submit_dir or (Path(env["SLURM_SUBMIT_DIR"]) if env.get("SLURM_SUBMIT_DIR") else None))
    if restart_count(env) > 0 and record.is_file():
        return Path(record.read_text().strip())
    root, name, explicit = run_location(args)
    run_dir = Path(explicit).absolute() if explicit else new_run_dir(root, name, tag=f"slurm{key}").absolute()
    write_atomic(record, f"{run_dir}\n")
    return run_dir


def _job_stdout(job_id: str) -> str | None:
    """The job's output file as SLURM resolved it (``%j`` etc. filled in), or ``None``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for field in out.split():
        if field.startswith("StdOut="):
            return field.partition("=")[2] or None
    return None


def note_start(run_dir: Path, env: dict[str, str] | None = None) -> None:
    """Create the run directory, link the job's log into it, and append one line per start to
    ``slurm-starts.jsonl`` (job, restart count, nodes, tasks): a requeue history next to the results."""
    env = dict(os.environ if env is None else env)
    run_dir.mkdir(parents=True, exist_ok=True)
    job_id = env.get("SLURM_JOB_ID", "")
    stdout = _job_stdout(job_id) if job_id else None
    if stdout:
        link = run_dir / f"slurm-{job_key(env)}.out"
        if not link.is_symlink() and not link.exists():
            with contextlib.suppress(OSError):  # a file system without symlinks: the log stays where it is
                link.symlink_to(stdout)
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "job": job_key(env),
        "restart_count": restart_count(env),
        "nodes": env.get("SLURM_JOB_NODELIST"),
        "num_nodes": env.get("SLURM_JOB_NUM_NODES"),
        "ntasks": env.get("SLURM_NTASKS"),
        "log": stdout,
    }
    with open(run_dir / STARTS_FILE, "a") as file:
        file.write(json.dumps(entry) + "\n")


# ------------------------------------------------------------------------------------------------ requeue
def job_reason(job: str) -> str:
    """Why SLURM is ending ``job`` (``TimeLimit``, ``Preempted``, ...), as ``scontrol`` reports it."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"\bReason=(\S+)", out.stdout)
    return match.group(1) if match else ""


def requeue(sigterm: bool, env: dict[str, str] | None = None) -> bool:
    """``scontrol requeue`` this job; after a SIGTERM only when SLURM is ending it for time or preemption (a user's
    ``scancel`` is not undone). Returns whether the job is back in the queue; says why on stderr if not."""
    job = job_key(env) or ""
    if not re.fullmatch(r"[0-9_]+", job):
        raise RuntimeError(f"unexpected SLURM job id {job!r}")
    if sigterm:
        reason = job_reason(job)
        if not reason.startswith(REQUEUE_REASONS):
            print(f"lightscale: SIGTERM with reason {reason or 'unknown'}: not requeueing", file=sys.stderr)
            return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"lightscale: could not requeue job {job}: {error}", file=sys.stderr)
        return False
    if result.returncode != 0:
        print(f"lightscale: scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m lightscale.cluster.slurm run-dir [lightscale fit args]``: print (and record) the job's run dir."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["run-dir"]:
        print("usage: python -m lightscale.cluster.slurm run-dir [lightscale fit args]", file=sys.stderr)
        sys.exit(2)
    try:
        run_dir = job_run_dir(argv[1:])
        note_start(run_dir)
    except (UserError, OSError) as error:
        print(f"lightscale: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(run_dir)


if __name__ == "__main__":
    main()
