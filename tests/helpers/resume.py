"""Kill -9 resume trials: run ``python -m lightscale fit`` uninterrupted, and again killed with SIGKILL at a
chosen step and resumed, then compare the final checkpoints tensor by tensor.

The killed process is stopped by :class:`PauseAt` (a callback the run loads by class path) at the end of
the chosen optimizer step: it writes a marker file and sleeps, and the test sends SIGKILL to the whole process
group (every DDP rank, as a node failure would), so no Python code, ``finally`` or ``atexit`` of the run
executes after the kill.
"""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

TESTS = Path(__file__).resolve().parents[1]


class PauseAt(L.Callback):
    """At the end of optimizer step ``step`` (before any checkpoint of that step): write ``marker`` and sleep for
    ``seconds`` (long enough for the test to kill the process, or to signal it and let it go on)."""

    def __init__(self, step: int, marker: str, seconds: float = 600) -> None:
        self.step, self.marker, self.seconds = step, marker, seconds

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if trainer.is_global_zero:
                Path(self.marker).write_text(str(self.step))
            time.sleep(self.seconds)


def trial_env(**extra: str) -> dict[str, str]:
    """Environment of a trial process: the test helpers importable, one thread (fast and reproducible on a
    shared 2-core machine), W&B off."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTSCALE_RUN_DIR", "MASTER_PORT", "LOCAL_RANK")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        WANDB_MODE="disabled",
        PYTHONHASHSEED="0",
    )
    env.update(extra)
    return env


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m lightscale ARGS`` in its own session (so the whole group can be killed), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lightscale", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or trial_env(),
            start_new_session=True,
        )


def wait(process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"timed out; output:\n{log.read_text()[-3000:]}") from None
    assert code == 0, f"exit code {code}; output:\n{log.read_text()[-3000:]}"


def kill_at_marker(process: subprocess.Popen, marker: Path, log: Path, timeout: float = 300) -> None:
    """Wait until the run pauses at its kill step, then SIGKILL its whole process group."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before its kill step; output:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"the run did not reach its kill step; output:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def pick_kill_step(total: int, steps_per_epoch: int, every: int, seed: int | None = None) -> int:
    """A random step, after the first epoch, that is neither an epoch end nor a checkpoint step (so work since
    the last checkpoint is lost and replayed). ``LIGHTSCALE_TRIAL_SEED`` reproduces a choice."""
    seed = int(os.environ.get("LIGHTSCALE_TRIAL_SEED", seed if seed is not None else time.time_ns() % 10**6))
    candidates = [k for k in range(steps_per_epoch + 1, total - 1) if k % steps_per_epoch and k % every]
    step = random.Random(seed).choice(candidates)
    print(f"kill step {step} (LIGHTSCALE_TRIAL_SEED={seed})")
    return step


def pause_callback_args(step: int, marker: Path) -> list[str]:
    return [
        "--trainer.callbacks+=helpers.resume.PauseAt",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.marker={marker}",
    ]


TIMING = ("throughput/", "time/", "memory/", "ranks/")  # wall-clock and memory columns: differ between any two runs


def metrics_history(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the wall-clock columns (and without rows that held only those)."""
    with (run_dir / "metrics.csv").open(newline="") as file:
        rows = [{k: v for k, v in row.items() if v and not k.startswith(TIMING)} for row in csv.DictReader(file)]
    return [row for row in rows if set(row) - {"step", "epoch"}]


def _strip_run_dir(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace(run_dir, "<run>")
    if isinstance(value, dict):
        return {_strip_run_dir(k, run_dir): _strip_run_dir(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_strip_run_dir(v, run_dir) for v in value)
    return value


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> int:
    """Recursively equal: tensors with ``torch.equal`` (bit-identical), everything else with ``==``.
    Returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max():g})"
        return 1
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        return sum(assert_same(a[k], b[k], f"{where}.{k}") for k in a)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        return sum(assert_same(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
    assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here
    return 0


def assert_same_final_state(reference_dir: Path, resumed_dir: Path, resumed: bool = True) -> int:
    """Compare the final ``last.ckpt`` of two runs: weights, optimizer and scheduler states, step, epoch,
    early-stopping / checkpoint-callback state and RNG states (the second run started once more than the first if
    ``resumed``). Returns the number of tensors compared."""
    ref = torch.load(reference_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    res = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ref["global_step"] == res["global_step"] and ref["epoch"] == res["epoch"]
    count = assert_same(ref["state_dict"], res["state_dict"], "state_dict")
    assert count > 0
    count += assert_same(ref["optimizer_states"], res["optimizer_states"], "optimizer_states")
    count += assert_same(ref["lr_schedulers"], res["lr_schedulers"], "lr_schedulers")
    callbacks_ref = _strip_run_dir(ref["callbacks"], str(reference_dir))
    callbacks_res = _strip_run_dir(res["callbacks"], str(resumed_dir))
    # RunSummary's totals: the same samples, one more start, and wall times that differ by nature
    summary_ref, summary_res = callbacks_ref.pop("RunSummary", None), callbacks_res.pop("RunSummary", None)
    if summary_ref is not None:
        assert summary_res is not None and summary_res["train_samples"] == summary_ref["train_samples"]
        assert summary_res["starts"] == summary_ref["starts"] + int(resumed)
    count += assert_same(callbacks_ref, callbacks_res, "callbacks")
    return count
