"""The test cluster behaves like a real multi-node SLURM cluster: 2 nodes x 2 tasks, and signal + requeue.

These are the two properties the preemption / multi-node Lightning tests rely on, checked with plain bash
jobs so a failure here points at the cluster, not at Lightning.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster.fixtures import SlurmCluster, sbatch_wait, squeue_state

pytestmark = pytest.mark.slurm


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body.lstrip())
    path.chmod(0o755)
    return path


def test_two_nodes_two_tasks_each(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "tasks"
    out.mkdir()
    script = _script(
        tmp_path / "ranks.sh",
        """
#SBATCH --nodes=2 --ntasks-per-node=2 --time=2
#SBATCH --output=slurm-%j.out
set -euo pipefail
srun bash -c 'echo "$SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME $SLURM_LOCALID" >"$1/task-$SLURM_PROCID"' \\
    _ "$1"
""",
    )
    job_id, rc = sbatch_wait(script, [str(out)], env=slurm_cluster.env, cwd=tmp_path, timeout=60)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert rc == 0, log

    rows = [f.read_text().split() for f in sorted(out.glob("task-*"))]
    assert sorted(int(r[0]) for r in rows) == [0, 1, 2, 3]
    by_node: dict[str, list[int]] = {}
    for procid, nodeid, nodename, localid in rows:
        by_node.setdefault(nodeid, []).append(int(procid))
        assert nodename == slurm_cluster.nodes[int(nodeid)]
        assert int(localid) in (0, 1)
    assert sorted(by_node) == ["0", "1"]
    assert all(len(procs) == 2 for procs in by_node.values())


def test_usr1_requeue_restarts_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """USR1 reaches the step (as Lightning's SLURM handler expects), ``scontrol requeue`` from inside the
    job puts it back in the queue, and it restarts with SLURM_RESTART_COUNT=1 under the same job id."""
    out = tmp_path / "out"
    out.mkdir()
    script = _script(
        tmp_path / "requeue.sh",
        """
#SBATCH --nodes=1 --ntasks=1 --time=3 --requeue --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail
OUT="$1"
echo "start restart_count=${SLURM_RESTART_COUNT:-unset}" >> "$OUT/events"
if [[ -z "${SLURM_RESTART_COUNT:-}" ]]; then
    # First run: the step waits for USR1 and then requeues its own job, like Lightning's SLURM handler.
    srun bash -c '
        trap "echo usr1 >> \\"$1/events\\"; scontrol requeue \\$SLURM_JOB_ID; exit 0" USR1
        echo "$SLURM_JOB_ID" > "$1/ready"
        while true; do sleep 0.2; done
    ' _ "$OUT"
    sleep 60  # requeue kills the whole job before this ends
    echo "not requeued" >> "$OUT/events"
    exit 1
fi
echo "SLURM_RESTART_COUNT=$SLURM_RESTART_COUNT" > "$OUT/result"
""",
    )
    result: dict[str, object] = {}
    name = f"requeue-{tmp_path.name}"

    def submit() -> None:
        try:
            result["job"] = sbatch_wait(
                script,
                [str(out)],
                env=slurm_cluster.env,
                cwd=tmp_path,
                timeout=90,
                options=["--job-name", name],
            )
        except BaseException as err:
            result["error"] = err

    waiter = threading.Thread(target=submit, daemon=True)
    t0 = time.monotonic()
    waiter.start()
    try:
        _signal_when_ready(out / "ready", slurm_cluster)
        t_signal = time.monotonic()
        waiter.join(timeout=120)
    finally:
        if waiter.is_alive():  # never leave the job behind for the next test
            subprocess.run(["scancel", f"--name={name}"], env=slurm_cluster.env, check=False)
    assert not waiter.is_alive(), "sbatch --wait did not return"
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    job_id, rc = result["job"]  # type: ignore[misc]
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert rc == 0, log
    assert (out / "ready").read_text().strip() == job_id  # same job id across the requeue
    assert (out / "result").read_text().strip() == "SLURM_RESTART_COUNT=1"
    events = (out / "events").read_text().splitlines()
    assert events == ["start restart_count=unset", "usr1", "start restart_count=1"]
    print(f"signal after {t_signal - t0:.1f} s, requeued run done {time.monotonic() - t_signal:.1f} s later")


def _signal_when_ready(ready: Path, cluster: SlurmCluster) -> None:
    """Wait (bounded) until the step has installed its USR1 trap and the job is RUNNING, then send USR1."""
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), "first run never reached the step"
    job_id = ready.read_text().strip()
    while squeue_state(job_id, cluster.env) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert squeue_state(job_id, cluster.env) == "RUNNING"
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster.env, check=True)
