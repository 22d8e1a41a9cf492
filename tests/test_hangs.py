"""A run that hangs ends with one line naming the stalled rank, its host and step, and leaves every rank's stack;
a slow rank shows in the logs before it becomes a hang."""

from __future__ import annotations

import bdb
import csv
import json
import os
import pickle
import socket
import threading
import time
from copy import deepcopy
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, REPO, python_cli, run_cli, without_logging_noise
from helpers.faults import Crash
from lightscale.resilience.hang_watch import HUNG_EXIT_CODE, describe_hang, stalled_ranks

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--run.test_after_fit", "false", "--run.report", "false"]  # fmt: skip
DDP = str(CONFIGS / "trainer" / "ddp.yaml")
TWO_PROCESSES = ["--config", DDP, "--trainer.accelerator", "cpu", "--trainer.devices", "2"]
FAST_WATCHDOG = ["--watchdog.stall_seconds", "4", "--watchdog.heartbeat_seconds", "0.5"]
HOST = socket.gethostname()
HELPERS = {"PYTHONPATH": str(REPO / "tests"), "OMP_NUM_THREADS": "1"}  # the fault callbacks, in the child processes


def error_lines(stderr: str) -> list[str]:
    lines = without_logging_noise(stderr)
    assert not any("Traceback" in line for line in lines), lines
    return [line for line in lines if line.startswith("lightscale: error: ")]


def wait_until_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_a_stalled_rank_ends_the_run_with_its_name_step_and_every_stack_and_the_run_resumes() -> None:
    run = Path("runs/hang")
    stall = ["--trainer.callbacks+=helpers.faults.StallAt", "--trainer.callbacks.step=3", "--trainer.callbacks.rank=1"]
    args = ["fit", "--config", DIGITS, "--config", CSV, *SHORT, *TWO_PROCESSES, *FAST_WATCHDOG,
            "--checkpoint.last_every_n_steps", "2", "--run.dir", str(run)]  # fmt: skip
    result = python_cli(*args, *stall, env=HELPERS, timeout=300)
    assert result.returncode == HUNG_EXIT_CODE, result.stderr[-3000:]
    diagnostics = run / "diagnostics"
    (line,) = error_lines(result.stderr)
    assert line.startswith(
        f"lightscale: error: rank 1 ({HOST}) is stalled at global step 3 (loading the next batch or in batch hooks), "
        "no progress for "
    ), line
    assert line.endswith(
        f"while 1 other rank(s) wait at global step 3 (in the forward); the stacks of every rank are in {diagnostics}"
    ), line
    # Each rank's stack shows where it was: rank 1 in the stalling callback, rank 0 in DDP's buffer broadcast.
    rank1 = (diagnostics / "stacks.rank1.txt").read_text()
    assert rank1.startswith(f"rank 1 ({HOST}, pid ") and "faults.py" in rank1 and "on_train_batch_start" in rank1
    rank0 = (diagnostics / "stacks.rank0.txt").read_text()
    assert "_sync_buffers" in rank0 and "faults.py" not in rank0
    hang = json.loads((diagnostics / "hang.json").read_text())
    assert hang["stalled_ranks"] == [1] and hang["message"] == line.removeprefix("lightscale: error: ")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "hung" and summary["error"] == hang["message"]
    strategy = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["strategy"]
    assert strategy["init_args"]["timeout"] in ("0:10:00", 600)  # the preset's collective timeout, not 30 minutes
    # No rank is left behind waiting, and the run resumes from its last checkpoint.
    assert wait_until_gone(hang["heartbeats"]["1"]["pid"]), "rank 1 outlived the run"
    resumed = python_cli("fit", "--config", DIGITS, "--config", CSV, *SHORT, *TWO_PROCESSES, "--run.dir", str(run),
                         "--ckpt_path", "auto", env=HELPERS, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 10  # 2 epochs x 5 batches per process


def test_a_stalled_single_process_ends_with_its_stack() -> None:
    run = Path("runs/hang-one")
    stall = ["--trainer.callbacks+=helpers.faults.StallAt", "--trainer.callbacks.step=2"]
    result = python_cli("fit", "--config", DIGITS, "--config", CSV, *SHORT, *FAST_WATCHDOG, "--run.dir", str(run),
                        *stall, env=HELPERS, timeout=300)  # fmt: skip
    assert result.returncode == HUNG_EXIT_CODE, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith("lightscale: error: no progress for ") and line.endswith(
        f"s on rank 0 ({HOST}) at global step 2 (loading the next batch or in batch hooks); its stack is in "
        f"{run / 'diagnostics'}"
    ), line
    stacks = (run / "diagnostics" / "stacks.rank0.txt").read_text()
    assert "faults.py" in stacks and "in on_train_batch_start" in stacks
    assert json.loads((run / "summary.json").read_text())["status"] == "hung"


def test_a_slow_rank_shows_in_the_logs_and_a_healthy_run_leaves_only_heartbeats() -> None:
    run = Path("runs/straggler")
    slow = ["--data.class_path", "helpers.faults.SlowReadDigits", "--data.init_args.seconds", "0.2"]
    result = python_cli("fit", "--config", DIGITS, "--config", CSV, *SHORT, *TWO_PROCESSES, *slow,
                        "--trainer.log_every_n_steps", "2", "--run.dir", str(run), env=HELPERS,
                        timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("ranks/data_slowest_rank")]
    assert len(rows) == 5  # 10 steps (2 epochs x 5 batches per process), every 2nd
    for row in rows:
        assert float(row["ranks/data_slowest_rank"]) == 1
        assert float(row["ranks/data_ms_max"]) >= 200 > 100 > float(row["ranks/data_ms_min"])
        assert float(row["ranks/data_ms_median"]) == pytest.approx(
            (float(row["ranks/data_ms_max"]) + float(row["ranks/data_ms_min"])) / 2
        )
        # The digits CNN has BatchNorm: DDP broadcasts its buffers at the start of every forward, where the fast
        # rank waits for the slow one.
        assert float(row["ranks/forward_ms_max"]) >= 150
    diagnostics = sorted(p.name for p in (run / "diagnostics").iterdir())
    assert diagnostics == ["heartbeat.rank0.json", "heartbeat.rank1.json"]
    for rank in (0, 1):
        beat = json.loads((run / "diagnostics" / f"heartbeat.rank{rank}.json").read_text())
        assert beat["rank"] == rank and beat["host"] == HOST and beat["step"] == 10


def test_the_watchdog_can_be_switched_off() -> None:
    args = ["fit", "--config", DIGITS, "--config", CSV, *SHORT, "--watchdog.stall_seconds", "null"]
    assert run_cli(*args, "--run.dir", "runs/no-watchdog") == 0
    assert not Path("runs/no-watchdog/diagnostics").exists()


def beat(rank: int, events: int, where: str, step: int = 7, idle: float = 301.0) -> dict:
    return {"rank": rank, "host": f"node{rank // 4}", "pid": 100 + rank, "step": step, "events": events,
            "where": where, "idle_seconds": idle, "time": 0.0}  # fmt: skip


def test_the_rank_furthest_behind_is_named() -> None:
    beats = {r: beat(r, 90, "in the backward") for r in range(8)}
    beats[5] = beat(5, 88, "loading the next batch or in batch hooks", idle=310.4)
    assert stalled_ranks(beats) == [5]
    assert describe_hang(beats, 8, Path("d")) == (
        "rank 5 (node1) is stalled at global step 7 (loading the next batch or in batch hooks), no progress for 310 s, "
        "while 7 other rank(s) wait at global step 7 (in the backward); the stacks of every rank are in d"
    )
    beats[6] = beat(6, 88, "loading the next batch or in batch hooks")
    assert stalled_ranks(beats) == [5, 6]
    assert describe_hang(beats, 8, Path("d")).startswith("rank 5 (node1), rank 6 (node1) are stalled at")


def test_ranks_that_all_stopped_at_the_same_point_are_not_blamed_on_one() -> None:
    beats = {r: beat(r, 90, "in the backward") for r in range(4)}
    assert stalled_ranks(beats) == []
    assert describe_hang(beats, 4, Path("d")) == (
        "all 4 ranks stopped at global step 7 (in the backward) with no progress for 301 s; no rank is behind the "
        "others: the stacks are in d"
    )


def test_a_run_that_fails_stops_its_watchdog() -> None:
    # A watchdog left running after an error would end the process (a notebook, a sweep, this test session)
    # once its stall limit passed.
    crash = ["--trainer.callbacks+=helpers.faults.CrashAt", "--trainer.callbacks.step=2"]
    with pytest.raises(Crash):
        run_cli(
            "fit",
            "--config",
            DIGITS,
            "--config",
            CSV,
            *SHORT,
            "--checkpoint.last_every_n_steps",
            "1",
            "--run.dir",
            "runs/crash",
            *crash,
        )
    assert not [t for t in threading.enumerate() if t.name == "lightscale-hang-watch"]
    assert json.loads(Path("runs/crash/diagnostics/heartbeat.rank0.json").read_text())["step"] == 2


def test_a_copy_of_the_watchdog_does_not_watch() -> None:
    from lightscale.callbacks import HangWatch

    watch = HangWatch(stall_seconds=60)
    watch._stop.set()
    copy = pickle.loads(pickle.dumps(deepcopy(watch)))
    assert copy.stall_seconds == 60 and copy._thread is None and not copy._stop.is_set()


def test_a_rank_stopped_at_a_breakpoint_is_not_taken_for_a_hang() -> None:
    from lightscale.resilience.hang_watch import in_debugger

    stopped, release = threading.Event(), threading.Event()

    def wait() -> None:
        stopped.set()
        release.wait(30)

    plain = threading.Thread(target=wait)
    debugged = threading.Thread(target=lambda: bdb.Bdb().runcall(wait))  # what pdb.set_trace() runs through
    for thread in (plain, debugged):
        stopped.clear()
        thread.start()
        assert stopped.wait(10)
    try:
        assert not in_debugger(plain.ident) and in_debugger(debugged.ident)
    finally:
        release.set()
        plain.join()
        debugged.join()


def test_only_well_formed_heartbeats_are_read(tmp_path: Path) -> None:
    from lightscale.resilience.hang_watch import read_heartbeats

    folder = tmp_path / "diagnostics"
    folder.mkdir()
    (folder / "heartbeat.rank0.json").write_text(json.dumps(beat(0, 5, "in the backward")))
    (folder / "heartbeat.rank1.json").write_text('{"rank": 1, "events": "many"}')  # foreign or crafted
    (folder / "heartbeat.rank2.json").write_text('{"rank": 2, "ho')  # half written
    (folder / "heartbeat.rank3.json").write_text("[1, 2]")
    assert list(read_heartbeats(tmp_path)) == [0]
