"""A run told to stop (SIGTERM from docker/Kubernetes/schedulers, Ctrl+C, SIGUSR1) outside SLURM saves a resumable
checkpoint at the next step, exits with 128 + the signal, is marked terminated in summary.json and W&B, and a resume
ends exactly where an uninterrupted run ends (weights, optimizer, RNG and the metrics history). SLURM's own signals
are tested on a real cluster in test_slurm_jobs.py."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import CONFIGS
from helpers.resume import assert_same_final_state, metrics_history, start, trial_env, wait
from helpers.wandb_offline import find_offline_runs, read_offline_run

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
ARGS = ["fit", "--config", DIGITS, "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--run.test_after_fit", "false",
        "--run.report", "false"]  # fmt: skip
STOP_AT = 14  # mid-epoch 1 (10 steps per epoch)
pytestmark = pytest.mark.slow


DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data", "helpers.probe.DistributedDigits"]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs, one process and 2-process DDP."""
    runs = {}
    for name, extra in (("single", []), ("ddp", DDP)):
        run_dir = tmp_path_factory.mktemp(f"reference-{name}") / "run"
        log = run_dir.parent / "log.txt"
        wait(start([*ARGS, *extra, "--run.dir", str(run_dir)], log, trial_env(WANDB_MODE="offline")), log)
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize(
    ("signum", "extra"),
    [(signal.SIGTERM, []), (signal.SIGINT, []), (signal.SIGUSR1, []), (signal.SIGTERM, DDP)],
    ids=["SIGTERM", "SIGINT", "SIGUSR1", "SIGTERM to a 2-process DDP run"],
)  # fmt: skip
def test_a_stop_signal_saves_exits_and_resumes_exactly(
    signum: int, extra: list[str], tmp_path: Path, references: dict[str, Path]
) -> None:
    run_dir, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "log.txt"
    pause = ["--trainer.callbacks+=helpers.resume.PauseAt", f"--trainer.callbacks.step={STOP_AT}",
             f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.seconds=3"]  # fmt: skip
    env = trial_env(WANDB_MODE="offline")
    process = start([*ARGS, *extra, "--run.dir", str(run_dir), *pause], log, env)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signum)  # to the launching process only, as `kill PID` and `docker stop` do
    assert process.wait(timeout=300) == 128 + signum, log.read_text()[-3000:]
    output = log.read_text()
    name = signal.Signals(signum).name
    assert f"lightscale: stopped by {name}; resume with --ckpt_path auto" in output and "Traceback" not in output

    import torch

    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == STOP_AT
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["signal"]) == ("terminated", name)
    (wandb_run,) = find_offline_runs(run_dir)
    assert read_offline_run(wandb_run).summary["lightscale/status"] == "terminated"

    wait(start([*ARGS, *extra, "--run.dir", str(run_dir), "--ckpt_path", "auto"], log, env), log)
    reference = references["ddp" if extra else "single"]
    assert assert_same_final_state(reference, run_dir) > 20
    assert metrics_history(run_dir) == metrics_history(reference)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
