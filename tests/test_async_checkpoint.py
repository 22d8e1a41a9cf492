"""Checkpoints written in the background (``--checkpoint.async_save true``): training goes on while a checkpoint is
written, the files are the ones a foreground save writes, and a kill in the middle of a background write leaves the
previous checkpoint to resume from, bit-identically."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, run_cli
from helpers.resume import assert_same_final_state, start, wait
from lightscale.resilience.checkpoint_io import safe_load

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
FAST = ["--run.test_after_fit", "false", "--run.report", "false", "--trainer.enable_progress_bar", "false"]
RUN = [
    "fit", "--config", DIGITS, "--config", CSV, *FAST, "--data.batch_size", "128", "--trainer.deterministic", "true",
    "--checkpoint.last_every_n_steps", "3",
]  # fmt: skip


def slow_disk_config(path: Path, log: Path, seconds: float, from_write: int = 1) -> str:
    callback = {"class_path": "helpers.faults.SlowDisk", "init_args": {"events": str(log), "seconds": seconds}}
    callback["init_args"]["from_write"] = from_write
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": [callback]}}))
    return str(path)


def events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def steps_during_writes(log: Path) -> int:
    """Optimizer steps that ended while a checkpoint was being written."""
    started, during = None, 0
    for event in events(log):
        if event["event"] == "write-start":
            started = event
        elif event["event"] == "write-end":
            started = None
        elif event["event"] == "step" and started is not None:
            during += 1
    return during


def test_training_goes_on_while_a_checkpoint_is_written_and_the_files_are_the_same(tmp_path: Path) -> None:
    runs = {}
    for mode in ("false", "true"):
        log = tmp_path / f"events-{mode}.jsonl"
        config = slow_disk_config(tmp_path / f"slow-{mode}.yaml", log, seconds=0.4)
        run_dir = tmp_path / f"async-{mode}"
        args = [*RUN, "--trainer.max_epochs", "2", "--config", config, "--checkpoint.async_save", mode]
        assert run_cli(*args, "--run.dir", str(run_dir)) == 0
        runs[mode] = run_dir, log
    foreground, background = runs["false"], runs["true"]
    writes = sum(e["event"] == "write-end" for e in events(background[1]))
    assert writes >= 8 and writes == sum(e["event"] == "write-end" for e in events(foreground[1]))
    assert steps_during_writes(foreground[1]) == 0  # a foreground write stops training
    assert steps_during_writes(background[1]) >= 2  # a background one does not
    # the same checkpoints, bit for bit: weights, optimizer, schedule, loops, RNG, callbacks
    assert assert_same_final_state(foreground[0], background[0], resumed=False) > 10
    names = {mode: sorted(p.name for p in (run_dir / "checkpoints").iterdir()) for mode, (run_dir, _) in runs.items()}
    assert names["true"] == names["false"] and any(n.startswith("best-") for n in names["true"]), names
    for name in names["true"]:  # every file whole; no temporary left behind
        assert safe_load(background[0] / "checkpoints" / name)["global_step"] > 0
    code = run_cli("validate", "--config", DIGITS, "--ckpt_path", str(background[0] / "checkpoints" / "last.ckpt"))
    assert code == 0


def stuck_write_passed(log: Path) -> bool:
    """The write that never ends has started, and training has finished a step after it."""
    try:
        seen = events(log)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return False
    stuck = next((e["step"] for e in seen if e["event"] == "write-start"), None)
    return stuck is not None and any(e["event"] == "step" and e["step"] > stuck for e in seen)


@pytest.mark.slow
def test_a_kill_during_a_background_write_keeps_the_previous_checkpoint_to_resume_from(tmp_path: Path) -> None:
    args = [*RUN, "--trainer.max_epochs", "3", "--checkpoint.async_save", "true"]
    reference = start([*args, "--run.dir", str(tmp_path / "ref")], tmp_path / "ref.log")
    log = tmp_path / "events.jsonl"
    config = slow_disk_config(tmp_path / "slow.yaml", log, seconds=600, from_write=3)  # the 3rd write never ends
    killed = start([*args, "--config", config, "--run.dir", str(tmp_path / "res")], tmp_path / "killed.log")
    deadline = time.monotonic() + 300
    while not stuck_write_passed(log):
        assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the whole run, as a node failure would
    killed.wait()

    done = [e for e in events(log) if e["event"] == "write-end" and e["path"].endswith("last.ckpt")]
    stuck = next(e for e in events(log) if e["event"] == "write-start")
    checkpoints = tmp_path / "res" / "checkpoints"
    assert safe_load(checkpoints / "last.ckpt")["global_step"] == done[-1]["step"] < stuck["step"]
    assert list(checkpoints.glob(".*.tmp")), "the write in flight was still in its temporary file"
    resumed = start([*args, "--run.dir", str(tmp_path / "res"), "--ckpt_path", "auto"], tmp_path / "res.log")
    wait(reference, tmp_path / "ref.log")
    wait(resumed, tmp_path / "res.log")
    assert "resuming from" in (tmp_path / "res.log").read_text()
    assert assert_same_final_state(tmp_path / "ref", tmp_path / "res") > 10
