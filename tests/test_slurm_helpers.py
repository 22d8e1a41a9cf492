"""Job run directories, the srun guard, sweep files and the W&B-agent adapter, without a SLURM cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, REPO, run_cli
from helpers.wandb_offline import find_offline_runs, read_offline_run
from lightscale.cluster.launch import check_srun, launch_id
from lightscale.cluster.slurm import job_info, job_key, job_run_dir, run_location
from lightscale.cluster.sweep import format_value, load_points, point_args
from lightscale.core.errors import UserError

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CPU = str(CONFIGS / "trainer" / "cpu.yaml")


# ---------------------------------------------------------------------------------------- run directories
def test_run_location_follows_configs_and_overrides(tmp_path: Path) -> None:
    assert run_location(["--config", DIGITS]) == ("runs", "digits", None)
    gpt = str(CONFIGS / "experiment" / "gpt-cpu.yaml")
    assert run_location(["--config", DIGITS, "--config", gpt]) == ("runs", "gpt-cpu", None)
    assert run_location(["--config", DIGITS, "--run.name=x", "--run.root", "/r"]) == ("/r", "x", None)
    own = tmp_path / "own.yaml"
    own.write_text("model:\n  class_path: my.pkg.BigNet\n")
    assert run_location(["--config", str(own)])[1] == "bignet"  # like the CLI: the model class, lower case
    assert run_location(["--config", str(own), "--run.dir", "d"])[2] == "d"


def test_first_start_new_dir_restart_same_dir(tmp_path: Path) -> None:
    env = {"SLURM_JOB_ID": "12", "SLURM_SUBMIT_DIR": str(tmp_path)}
    first = job_run_dir(["--config", DIGITS, "--run.root", str(tmp_path / "runs")], env)
    assert first.parent == tmp_path / "runs" / "digits" and first.name.endswith("-slurm12")
    assert (tmp_path / ".lightscale" / "slurm" / "12.rundir").read_text().strip() == str(first)
    again = job_run_dir(["--config", DIGITS], {**env, "SLURM_RESTART_COUNT": "2"})
    assert again == first


def test_first_start_ignores_a_stale_record(tmp_path: Path) -> None:
    """Job ids restart at 1 when a cluster's state is reset: a record left by an older job 12 (with its
    checkpoints) must not be picked up by a new job 12, which is on its first start."""
    stale = tmp_path / "runs" / "digits" / "old-slurm12"
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "hpc_ckpt_1.ckpt").write_bytes(b"old")
    record = tmp_path / ".lightscale" / "slurm" / "12.rundir"
    record.parent.mkdir(parents=True)
    record.write_text(f"{stale}\n")
    env = {"SLURM_JOB_ID": "12", "SLURM_SUBMIT_DIR": str(tmp_path)}
    new = job_run_dir(["--config", DIGITS, "--run.root", str(tmp_path / "runs")], env)
    assert new != stale and not new.exists()
    assert record.read_text().strip() == str(new)


def test_array_tasks_get_their_own_dirs(tmp_path: Path) -> None:
    env = {
        "SLURM_JOB_ID": "40",
        "SLURM_ARRAY_JOB_ID": "39",
        "SLURM_ARRAY_TASK_ID": "1",
        "SLURM_SUBMIT_DIR": str(tmp_path),
    }
    assert job_key(env) == "39_1"
    assert job_run_dir(["--config", DIGITS, "--run.root", str(tmp_path)], env).name.endswith("-slurm39_1")


def test_every_rank_of_a_launch_derives_the_same_run_name() -> None:
    array_task = {"SLURM_JOB_ID": "40", "SLURM_ARRAY_JOB_ID": "39", "SLURM_ARRAY_TASK_ID": "1", "SLURM_NTASKS": "4"}
    assert launch_id(array_task) == "slurm-39_1" and job_key(array_task) == "39_1"
    assert launch_id({"TORCHELASTIC_RUN_ID": "abc", "WORLD_SIZE": "2"}) == "torchrun-abc"
    assert launch_id({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: a random name is fine
    assert job_info(array_task) == {
        "job_id": 40,
        "array_job_id": 39,
        "array_task_id": 1,
        "ntasks": 4,
        "restart_count": 0,
    }


def test_refuses_to_start_without_srun() -> None:
    batch = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_JOB_NAME": "lightscale"}
    with pytest.raises(UserError, match="srun"):
        check_srun(batch)
    check_srun({**batch, "SLURM_STEP_ID": "0"})  # a task started by srun
    check_srun({**batch, "SLURM_NTASKS": "1"})  # a one-task job needs no srun
    check_srun({**batch, "SLURM_JOB_NAME": "interactive"})  # Lightning ignores SLURM here
    check_srun({})


def test_missing_srun_is_one_line_before_lightning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_JOB_NAME": "lightscale"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.delenv("SLURM_STEPID", raising=False)
    assert run_cli("fit", "--config", DIGITS) == 2
    assert capsys.readouterr().err.strip().startswith("lightscale: error: this SLURM job has 2 tasks")


# ------------------------------------------------------------------------------------------------- sweeps
def test_grid_and_points(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {"grid": {"model.init_args.lr": [0.1, 0.2], "data.init_args.batch_size": [8, 16]}, "points": [{"a": 1}]},
            sort_keys=False,
        )
    )
    points = load_points(sweep)
    assert len(points) == 4
    assert points[1] == {"a": 1, "model.init_args.lr": 0.1, "data.init_args.batch_size": 16}  # last key fastest
    assert point_args(points[1]) == ["--a=1", "--model.init_args.lr=0.1", "--data.init_args.batch_size=16"]
    assert [format_value(v) for v in (True, None, [32, 64], "1e-3", 3e-4)] == [
        "true",
        "null",
        "[32, 64]",
        "1e-3",
        "0.0003",
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {x: []}\n")
    with pytest.raises(UserError, match="non-empty list"):
        load_points(bad)


def test_shipped_sweep_files_parse() -> None:
    assert len(load_points(REPO / "slurm" / "sweeps" / "digits-lr.yaml")) == 6
    spec = yaml.safe_load((REPO / "slurm" / "sweeps" / "wandb-digits.yaml").read_text())
    assert spec["command"][-3:] == ["lightscale.cluster.sweep", "run", "${args}"]


def test_sweep_cli_point(tmp_path: Path) -> None:
    sweep = tmp_path / "s.yaml"
    sweep.write_text("grid:\n  model.init_args.lr: [0.1, 0.2, 0.3]\n")
    out = subprocess.run(
        [sys.executable, "-m", "lightscale.cluster.sweep", "point", str(sweep), "2"], capture_output=True, text=True
    )
    assert out.stdout.split() == ["--model.init_args.lr=0.3"]
    out = subprocess.run(
        [sys.executable, "-m", "lightscale.cluster.sweep", "grid", str(sweep), "3", "--", "true"],
        text=True,
        capture_output=True,
    )
    assert out.returncode == 2 and "--array=0-2" in out.stderr


def test_wandb_agent_values_reach_the_config(tmp_path: Path) -> None:
    """Run the W&B sweep's command the way `wandb agent` does (its point as --key=value arguments, its run id in
    WANDB_RUN_ID): the values land in the LightningCLI config, and the run logs to the agent's W&B run."""
    template = [
        sys.executable, "-m", "lightscale", "fit", "--config", DIGITS, "--config", CPU, "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--run.test_after_fit", "false",
        "--run.report", "false", "--trainer.enable_progress_bar", "false", "{}",
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # not this process's W&B service
        "LIGHTSCALE_SWEEP_TEMPLATE": json.dumps(template),
        "WANDB_RUN_ID": "agent123",
        "WANDB_MODE": "offline",
    }
    agent_args = ["--model.init_args.lr=0.0123", "--data.init_args.batch_size=32"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightscale.cluster.sweep", "run", *agent_args],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "digits").iterdir()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["init_args"]["lr"] == 0.0123 and config["data"]["init_args"]["batch_size"] == 32
    (wandb_run,) = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert wandb_run.run_id == "agent123"
    assert wandb_run.config["model"]["init_args"]["lr"] == 0.0123


def test_requeued_agent_task_repeats_its_point(tmp_path: Path) -> None:
    """After a requeue an agent task must not ask the W&B agent for a new point: it re-runs the recorded one."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))},
        "SLURM_JOB_ID": "8", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2", "SLURM_SUBMIT_DIR": str(tmp_path),
        "PATH": f"{tmp_path / 'no-wandb'}:{os.environ['PATH']}",
    }  # fmt: skip
    record = tmp_path / ".lightscale" / "slurm" / "7_2.point.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"args": ["--model.init_args.lr=0.5"], "wandb_run_id": "r1", "group": "g"}))
    (tmp_path / ".lightscale" / "slurm" / "7_2.rundir").write_text(f"{tmp_path / 'run'}\n")
    fake_agent = tmp_path / "no-wandb" / "wandb"
    fake_agent.parent.mkdir()
    fake_agent.write_text('#!/bin/bash\necho "$*" > agent-called\nexit 7\n')
    fake_agent.chmod(0o755)
    command = [sys.executable, "-m", "lightscale.cluster.sweep", "agent", "e/p/s", "--", "echo", "fit", "{}", "--tail"]
    first = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert first.returncode == 7  # first start: `wandb agent --count 1` runs (here a stand-in)
    assert (tmp_path / "agent-called").read_text().split() == ["agent", "--count", "1", "e/p/s"]
    (tmp_path / "agent-called").unlink()
    restarted = subprocess.run(
        command, env={**env, "SLURM_RESTART_COUNT": "1"}, cwd=tmp_path, capture_output=True, text=True
    )
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.split() == ["fit", "--model.init_args.lr=0.5", "--tail"]  # the recorded point
    assert not (tmp_path / "agent-called").exists()
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() == "r1"  # and its W&B run


# ------------------------------------------------------------------------------------------------ requeue
@pytest.mark.parametrize(
    ("sigterm", "reason", "requeued"),
    [(False, "None", True), (True, "TimeLimit", True), (True, "Preempted", True), (True, "None", False)],
    ids=["usr1", "sigterm-time-limit", "sigterm-preempted", "sigterm-scancel"],
)
def test_requeue_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm: bool, reason: str, requeued: bool
) -> None:
    """USR1 always requeues; SIGTERM only when SLURM ends the job for its time limit or a preemption, never
    after the user's own `scancel` (which would otherwise be undone)."""
    from lightscale.cluster.slurm import requeue

    calls = tmp_path / "calls"
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.parent.mkdir()
    scontrol.write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\n'
        f'[[ $1 == show ]] && echo "JobId=7 JobState=COMPLETING Reason={reason} Restarts=0"\nexit 0\n'
    )
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{scontrol.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert requeue(sigterm=sigterm) is requeued
    assert ("requeue 7" in calls.read_text().splitlines()) is requeued
