"""The real ``slurm/train.sbatch``, ``slurm/sweep.sbatch`` and ``slurm/submit.sh`` on a real SLURM cluster.

Only the resources are overridden on the sbatch command line, for CPUs (``--gpus-per-node=0
--cpus-per-task=1``); the scripts, the preflight and the requeue path are the ones users run. Jobs train the
digits model for a few dozen steps on the CPU (gloo), so the whole module takes a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from cluster.fixtures import SlurmCluster, sbatch_wait, squeue_state
from conftest import CONFIGS, REPO
from helpers.wandb_offline import find_offline_runs, read_offline_run
from test_parallel_layouts import EXPERIMENT, compare, fit_args, results, sizing, strip

pytestmark = pytest.mark.slurm

TRAIN = REPO / "slurm" / "train.sbatch"
SUBMIT = REPO / "slurm" / "submit.sh"
DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CPU = str(CONFIGS / "trainer" / "cpu.yaml")
CPU_RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
QUIET = ["--run.report", "false", "--trainer.enable_progress_bar", "false"]
PROBE = ["--trainer.callbacks+=helpers.probe.Probe"]


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """What a user's shell would hold: the cluster, lightscale's venv, offline W&B; plus the test helpers
    importable and MASTER_ADDR (the test cluster's node names n1/n2 do not resolve)."""
    return {
        **{k: v for k, v in cluster.env.items() if k != "WANDB_SERVICE"},  # not the test process's W&B service
        "LIGHTSCALE_VENV": str(REPO / ".venv"),
        "PATH": f"{REPO / '.venv' / 'bin'}:{cluster.env.get('PATH', '')}",
        "MASTER_ADDR": "127.0.0.1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(REPO / "tests"),
        "OMP_NUM_THREADS": "1",
    }


def job_log(cwd: Path, job_id: str) -> str:
    logs = sorted(cwd.glob(f"slurm-*-{job_id}*.out"))
    return "\n".join(f"==> {p.name}\n{p.read_text()}" for p in logs)


def only_run_dir(cwd: Path, job_key: str) -> Path:
    dirs = sorted(p for p in (cwd / "runs").glob("*/*") if p.is_dir())
    assert len(dirs) == 1, dirs
    assert dirs[0].name.endswith(f"-slurm{job_key}"), dirs[0]
    recorded = (cwd / ".lightscale" / "slurm" / f"{job_key}.rundir").read_text().strip()
    assert Path(recorded) == dirs[0].absolute()
    return dirs[0]


def rank_weights(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted((run_dir / "probe").glob("weights-rank*.pt"))
    return [torch.load(f, weights_only=True) for f in files]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


def one_wandb_run(run_dir: Path, starts: int = 1) -> str:
    """The run dir holds ``starts`` offline W&B runs (one per job start, rank 0 only), all with the stored id."""
    runs = [read_offline_run(p, allow_truncated_tail=True) for p in find_offline_runs(run_dir)]
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    assert len(runs) == starts, [r.run_dir for r in runs]
    assert {r.run_id for r in runs} == {run_id}
    return run_id


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------------------------- 1 x 2
def test_one_node_two_tasks_matches_single_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`sbatch --wait slurm/train.sbatch` with 2 tasks: both ranks train, one run dir, one W&B run, and the
    test metrics of the DDP job equal a single process evaluating the same checkpoint on the same data."""
    env = job_env(slurm_cluster)
    args = [DIGITS, "--config", CPU, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", *QUIET, *PROBE]
    job, rc = sbatch_wait(
        TRAIN, args, env=env, cwd=tmp_path, timeout=240, options=["--ntasks-per-node=2", *CPU_RESOURCES]
    )
    log = job_log(tmp_path, job)
    assert rc == 0, log
    run_dir = only_run_dir(tmp_path, job)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    weights = rank_weights(run_dir)
    assert [w["world_size"] for w in weights] == [2, 2]
    assert_same_weights(weights[0]["weights"], weights[1]["weights"])
    one_wandb_run(run_dir)
    ddp = summary(run_dir)
    assert ddp["world_size"] == 2 and ddp["global_step"] == 8  # 2 epochs x 4 batches per rank

    # 270 test images split 135/135 over the ranks (no DistributedSampler padding), so the DDP-synced
    # torchmetrics and the rank-averaged loss must equal one process on the same checkpoint.
    best = run_dir / ddp["best"]["checkpoint"]
    single = subprocess.run(
        [sys.executable, "-m", "lightscale", "test", "--config", DIGITS, "--config", CPU, *QUIET,
         "--run.root", str(tmp_path / "single"), "--ckpt_path", str(best)],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO / "tests")}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    (single_dir,) = (tmp_path / "single").glob("*/*")
    one = summary(single_dir)["test_metrics"]
    assert one["test/acc"] == pytest.approx(ddp["test_metrics"]["test/acc"], abs=1e-7)
    assert one["test/f1"] == pytest.approx(ddp["test_metrics"]["test/f1"], abs=1e-6)
    assert one["test/loss"] == pytest.approx(ddp["test_metrics"]["test/loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------------- 2 x 2
def test_two_nodes_two_tasks_agree(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    env = job_env(slurm_cluster)
    args = [
        DIGITS, "--config", CPU, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--run.test_after_fit", "false", *QUIET, *PROBE,
    ]  # fmt: skip
    options = ["--nodes=2", "--ntasks-per-node=2", *CPU_RESOURCES]
    job, rc = sbatch_wait(TRAIN, args, env=env, cwd=tmp_path, timeout=240, options=options)
    log = job_log(tmp_path, job)
    assert rc == 0, log
    run_dir = only_run_dir(tmp_path, job)
    weights = rank_weights(run_dir)
    assert len(weights) == 4 and {w["world_size"] for w in weights} == {4}
    for other in weights[1:]:
        assert_same_weights(weights[0]["weights"], other["weights"])
    assert summary(run_dir)["global_step"] == 3  # 1259 images / 4 ranks / 128 per batch: 3 batches each
    start = json.loads((run_dir / "slurm-starts.jsonl").read_text().splitlines()[0])
    assert start["num_nodes"] == "2" and start["ntasks"] == "4" and start["nodes"] == "n[1-2]"
    one_wandb_run(run_dir)


def test_hsdp_two_nodes_matches_single_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """configs/trainer/hsdp.yaml as written (2 nodes x 2 tasks: FSDP2 within a node, replicated across the two)
    trains the tiny GPT as one process does: same per-step loss and gathered final weights (the tolerances of
    test_parallel_layouts.py)."""
    env = job_env(slurm_cluster)
    hsdp = ["--config", str(CONFIGS / "trainer" / "hsdp.yaml"), "--trainer.accelerator", "cpu"]
    args = [EXPERIMENT, *sizing(tmp_path / "job", 4), *hsdp]
    options = ["--nodes=2", "--ntasks-per-node=2", *CPU_RESOURCES]
    job, rc = sbatch_wait(TRAIN, args, env=env, cwd=tmp_path, timeout=300, options=options)
    assert rc == 0, job_log(tmp_path, job)
    only_run_dir(tmp_path, job)
    hybrid = strip(results(tmp_path, 4, {"net.blocks.0.mlp.c_fc.weight": ("replicate", "shard")}))

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    one = subprocess.run(
        [sys.executable, "-m", "lightscale", *fit_args(single_dir, 1), "--trainer.accelerator", "cpu",
         "--trainer.devices", "1"],
        cwd=single_dir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    compare("slurm hsdp 2x2", strip(results(single_dir, 1)), hybrid)


# ------------------------------------------------------------------------------------------------ a hang
def test_a_rank_that_hangs_on_the_second_node_ends_the_job_with_its_name(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Rank 1 (the only task on node n2) stops after step 2; the job ends on its own with exit 3, one line that
    names rank 1, its host and step in the job log, and both ranks' stacks in the run directory."""
    env = job_env(slurm_cluster)
    args = [
        DIGITS, "--config", CPU, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", *QUIET,
        "--watchdog.stall_seconds", "5", "--watchdog.heartbeat_seconds", "0.5",
        "--trainer.callbacks+=helpers.faults.StallAt", "--trainer.callbacks.step=2", "--trainer.callbacks.rank=1",
    ]  # fmt: skip
    options = ["--nodes=2", "--ntasks-per-node=1", *CPU_RESOURCES]
    job, rc = sbatch_wait(TRAIN, args, env=env, cwd=tmp_path, timeout=240, options=options)
    log = job_log(tmp_path, job)
    assert rc != 0, log
    run_dir = only_run_dir(tmp_path, job)
    hang = json.loads((run_dir / "diagnostics" / "hang.json").read_text())
    assert hang["stalled_ranks"] == [1] and hang["heartbeats"]["1"]["host"] == "n2", hang
    lines = [line for line in log.splitlines() if line.startswith("lightscale: error: ")]
    assert lines == [f"lightscale: error: {hang['message']}"], log
    assert hang["message"].startswith("rank 1 (n2) is stalled at global step 2 (loading the next batch")
    assert "faults.py" in (run_dir / "diagnostics" / "stacks.rank1.txt").read_text()
    assert (run_dir / "diagnostics" / "stacks.rank0.txt").read_text().startswith("rank 0 (n1, pid ")
    assert summary(run_dir)["status"] == "hung"


# ------------------------------------------------------------------------------------------------ requeue
def test_usr1_requeues_and_resumes_exactly(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`scancel --signal=USR1` mid-epoch: every rank saves at a step boundary into this job's run dir, the job
    requeues itself, restarts (SLURM_RESTART_COUNT=1), resumes from that checkpoint, finishes the same 30 steps
    with the same W&B run, and ends with weights bit-identical to an uninterrupted job run alongside.

    The data is ``helpers.probe.DistributedDigits``: the stock DigitsDataModule's shuffling is not replayed
    exactly by a mid-epoch DDP resume (see that class), which is a data-module matter, not a requeue one."""
    env = job_env(slurm_cluster)
    args = [
        DIGITS, "--config", CPU, "--data", "helpers.probe.DistributedDigits", "--trainer.max_epochs", "3",
        "--trainer.limit_train_batches", "10", "--trainer.limit_val_batches", "2", "--run.test_after_fit", "false",
        "--data.batch_size", "64", *QUIET, *PROBE, "--trainer.callbacks.step_delay", "0.3",
    ]  # fmt: skip
    options = ["--ntasks-per-node=2", *CPU_RESOURCES]
    results: dict[str, Any] = {}

    def submit(name: str) -> None:
        try:
            results[name] = sbatch_wait(
                TRAIN, args, env=env, cwd=tmp_path, timeout=420, options=[*options, f"--job-name={name}"]
            )
        except BaseException as error:
            results[name] = error

    names = (f"preempted-{tmp_path.name}", f"reference-{tmp_path.name}")
    threads = [threading.Thread(target=submit, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    try:
        job = _signal_mid_training(tmp_path, names[0], slurm_cluster, min_step=12)
        for thread in threads:
            thread.join(timeout=450)
    finally:
        for name in names:
            subprocess.run(["scancel", f"--name={name}"], env=slurm_cluster.env, check=False)
    for name in names:
        if isinstance(results.get(name), BaseException):
            raise results[name]
    (job_a, rc_a), (job_b, rc_b) = results[names[0]], results[names[1]]
    assert job_a == job
    log_a = job_log(tmp_path, job_a)
    assert rc_a == 0 and rc_b == 0, log_a + job_log(tmp_path, job_b)

    run_a = next(p for p in (tmp_path / "runs" / "digits").iterdir() if p.name.endswith(f"slurm{job_a}"))
    run_b = next(p for p in (tmp_path / "runs" / "digits").iterdir() if p.name.endswith(f"slurm{job_b}"))
    starts = [json.loads(line) for line in (run_a / "slurm-starts.jsonl").read_text().splitlines()]
    assert [s["restart_count"] for s in starts] == [0, 1]
    assert f"signal SIGUSR1: saving {run_a / 'hpc_ckpt_1.ckpt'}" in log_a
    assert "job requeued; exiting" in log_a
    assert f"resuming from {run_a / 'hpc_ckpt_1.ckpt'}" in log_a
    assert sorted(p.name for p in run_a.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    assert not list(run_a.glob(".requeue*"))
    assert summary(run_a)["global_step"] == summary(run_b)["global_step"] == 30
    one_wandb_run(run_a, starts=2)  # both starts, rank 0 only, one W&B run id
    one_wandb_run(run_b)
    weights_a, weights_b = rank_weights(run_a), rank_weights(run_b)
    assert len(weights_a) == len(weights_b) == 2
    for a, b in zip(weights_a, weights_b, strict=True):
        assert a["global_step"] == b["global_step"] == 30
        assert_same_weights(a["weights"], b["weights"])


def _signal_mid_training(cwd: Path, name: str, cluster: SlurmCluster, min_step: int) -> str:
    """Wait until the named job's rank 0 has finished ``min_step`` steps, then send USR1 to all its tasks."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ids = subprocess.run(
            ["squeue", "-h", "-n", name, "-o", "%i"], env=cluster.env, capture_output=True, text=True, check=False
        ).stdout.split()
        steps = list((cwd / "runs").glob(f"*/*-slurm{ids[0]}/probe/step-rank0")) if ids else []
        if steps and int(steps[0].read_text() or 0) >= min_step and squeue_state(ids[0], cluster.env) == "RUNNING":
            subprocess.run(["scancel", "--signal=USR1", ids[0]], env=cluster.env, check=True)
            return ids[0]
        time.sleep(0.3)
    raise TimeoutError(f"job {name} never reached step {min_step}")


# -------------------------------------------------------------------------------------------------- sweep
def test_sweep_array_runs_each_point(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`slurm/submit.sh --sweep` (preflight, then an array sized to the sweep): three runs whose configs differ
    exactly by the swept value, three W&B runs in one group."""
    sweep = tmp_path / "lr.yaml"
    sweep.write_text("name: lr\ngrid:\n  model.init_args.lr: [0.001, 0.002, 0.004]\n")
    env = job_env(slurm_cluster)
    args = [
        "--sweep", str(sweep), "--ntasks-per-node=1", *CPU_RESOURCES, "--wait", DIGITS, "--config", CPU,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--run.test_after_fit", "false", *QUIET,
    ]  # fmt: skip
    proc = subprocess.run(
        ["bash", str(SUBMIT), *args], cwd=tmp_path, env={**env, "PREFLIGHT_ARGS": "--no-step"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preflight ok" in proc.stdout and "3 points, all parse" in proc.stdout
    job = proc.stdout.split("submitted job ")[1].split()[0]
    run_dirs = [only_task_dir(tmp_path, f"{job}_{i}") for i in range(3)]
    configs = [_flat(yaml.safe_load((d / "config.yaml").read_text())) for d in run_dirs]
    differing = {
        key
        for key in set().union(*configs)
        if len({json.dumps(c.get(key)) for c in configs}) > 1
        and not any(str(c.get(key, "")).startswith(str(d.absolute())) for c, d in zip(configs, run_dirs, strict=True))
    }
    assert differing == {"model.init_args.lr"}  # (paths inside each run's own directory differ too, naturally)
    assert [c["model.init_args.lr"] for c in configs] == [0.001, 0.002, 0.004]
    runs = [read_offline_run(p) for d in run_dirs for p in find_offline_runs(d)]
    assert len({r.run_id for r in runs}) == 3
    assert {r.group for r in runs} == {f"lr-{job}"}
    assert [r.config["model"]["init_args"]["lr"] for r in runs] == [0.001, 0.002, 0.004]


def test_wandb_agent_array_task(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """`sweep.sbatch wandb:ENTITY/PROJECT/ID`: the task runs `wandb agent --count 1`, and the agent's point and
    run id reach the LightningCLI config and the W&B run. The agent is a stand-in (the real one needs a W&B
    server) that does what the real one does: run the sweep's command with --key=value and WANDB_RUN_ID."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f"export PATH={bin_dir}:{REPO / '.venv' / 'bin'}:$PATH\n")
    (bin_dir / "wandb").write_text(
        '#!/bin/bash\n[[ "$1 $2 $3" == "agent --count 1" ]] || exit 3\necho "$4" > agent-called\n'
        "WANDB_RUN_ID=agent$SLURM_ARRAY_TASK_ID exec python -m lightscale.cluster.sweep run "
        "--model.init_args.lr=0.0077 --data.init_args.batch_size=32\n"
    )
    (bin_dir / "wandb").chmod(0o755)
    args = [
        "wandb:me/proj/abc", DIGITS, "--config", CPU, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--run.test_after_fit", "false", *QUIET,
    ]  # fmt: skip
    env = {**job_env(slurm_cluster), "LIGHTSCALE_VENV": str(tmp_path / "venv")}
    options = ["--array=0-0", "--ntasks-per-node=1", *CPU_RESOURCES]
    job, rc = sbatch_wait(REPO / "slurm" / "sweep.sbatch", args, env=env, cwd=tmp_path, timeout=240, options=options)
    assert rc == 0, job_log(tmp_path, job)
    assert (tmp_path / "agent-called").read_text().strip() == "me/proj/abc"
    run_dir = only_task_dir(tmp_path, f"{job}_0")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == 0.0077 and config["data"]["init_args"]["batch_size"] == 32
    assert one_wandb_run(run_dir) == "agent0"
    (run,) = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert run.group == f"wandb-sweep-{job}" and run.config["model"]["init_args"]["lr"] == 0.0077


def only_task_dir(cwd: Path, key: str) -> Path:
    (run_dir,) = [p for p in (cwd / "runs").glob("*/*") if p.name.endswith(f"-slurm{key}")]
    return run_dir


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


# ---------------------------------------------------------------------------------------------- preflight
def test_submit_refuses_before_queueing(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A tasks/GPUs mismatch and a misspelt config key: submit.sh exits 2 with the preflight's one line and
    nothing reaches the queue. (The two submissions run side by side to save time.)"""
    cases = {
        "tasks-vs-gpus": (["--ntasks-per-node=2", "--gpus-per-node=4"], [], "Lightning runs one task per GPU"),
        "bad-key": (["--ntasks-per-node=1", "--gpus-per-node=0"], ["--trainer.max_epochz", "2"], "trainer.max_epochz"),
    }
    procs = {}
    for case, (options, overrides, _) in cases.items():
        cwd = tmp_path / case
        cwd.mkdir()
        procs[case] = subprocess.Popen(
            ["bash", str(SUBMIT), *options, f"--job-name=refused-{case}-{tmp_path.name}", DIGITS, "--config", CPU,
             *overrides],
            cwd=cwd, env={**job_env(slurm_cluster), "PREFLIGHT_ARGS": "--no-step"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, out + err
        assert cases[case][2] in err and "nothing was submitted" in err
        assert "submitted job" not in out
        queued = subprocess.run(
            ["squeue", "-h", "-n", f"refused-{case}-{tmp_path.name}"],
            env=slurm_cluster.env, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert queued.strip() == ""
        assert not (tmp_path / case / "runs").exists() and not list((tmp_path / case).glob("slurm-*.out"))
