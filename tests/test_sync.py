"""``lightscale sync [--watch]``: offline W&B runs uploaded while they grow, closed when they end, and one line
when there is no key or no network.

The upload step is the only stand-in: it records what ``wandb sync`` would send by reading the real ``.wandb``
file at that moment. Everything else (the runs, their files, the finish markers) is what training writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, REPO, python_cli, run_cli
from helpers.wandb_offline import read_offline_run
from lightscale.core.run_dir import WANDB_FINISHED_MARKER
from lightscale.tracking.sync import SYNCED_MARKER, Upload, Watcher, find_offline_runs, upload_with_wandb

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--run.test_after_fit", "false",
         "--run.report", "false"]  # fmt: skip


class Recorder:
    """Stands in for the network: what each upload would send, read from the real file."""

    def __init__(self) -> None:
        self.sent: list[tuple[Upload, int, int | None]] = []  # (upload, history rows, exit code)

    def __call__(self, upload: Upload) -> None:
        run = read_offline_run(upload.run, allow_truncated_tail=not upload.final)
        self.sent.append((upload, len(run.history), run.exit_code))


def test_a_finished_run_is_uploaded_once_with_its_end_and_then_left() -> None:
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", "runs/done") == 0
    (offline,) = find_offline_runs([Path("runs")])
    assert (offline / WANDB_FINISHED_MARKER).exists()  # the CLI closed the W&B run
    recorder, said = Recorder(), []
    watcher = Watcher([Path("runs")], recorder, say=said.append)
    assert watcher.step() == 0
    ((upload, rows, exit_code),) = recorder.sent
    assert upload.run == offline and upload.final and exit_code == 0 and rows >= 4
    assert upload.size == next(offline.glob("run-*.wandb")).stat().st_size
    assert (offline / SYNCED_MARKER).exists() and said == [f"lightscale sync: {offline}: uploaded, finished"]
    assert watcher.step() == 0 and len(recorder.sent) == 1  # nothing more to send, also for a new watcher
    assert Watcher([Path("runs/done")], recorder).step() == 0 and len(recorder.sent) == 1


def test_a_running_job_is_uploaded_as_it_grows_and_closed_when_it_ends() -> None:
    # W&B writes its offline file in 32 KiB blocks: 60 steps logged at every step fill a few of them.
    slow = ["--trainer.callbacks+=helpers.probe.Probe", "--trainer.callbacks.step_delay", "0.1",
            "--trainer.max_epochs", "15", "--trainer.log_every_n_steps", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    job = subprocess.Popen(
        [sys.executable, "-m", "lightscale", "fit", "--config", DIGITS, *SHORT, *slow, "--run.dir", "runs/live"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    recorder = Recorder()
    watcher = Watcher([Path("runs")], recorder, say=lambda line: None)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (watcher.watch(0.3, until_done=True), done.set()), daemon=True)
    thread.start()
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert done.wait(60), "the watcher did not see the run end"
    sizes = [upload.size for upload, _, _ in recorder.sent]
    rows = [count for _, count, _ in recorder.sent]
    assert len(sizes) >= 3 and sizes == sorted(set(sizes))  # several uploads, each of a longer file
    assert rows[0] < rows[-1] and rows == sorted(rows)
    assert [upload.final for upload, _, _ in recorder.sent] == [False] * (len(sizes) - 1) + [True]
    assert recorder.sent[-1][2] == 0 and all(code is None for _, _, code in recorder.sent[:-1])


def test_a_run_never_closed_is_uploaded_a_last_time_once_stale() -> None:
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", "runs/killed") == 0
    (offline,) = find_offline_runs([Path("runs")])
    (offline / WANDB_FINISHED_MARKER).unlink()  # as after kill -9: the run was never closed
    recorder = Recorder()
    watcher = Watcher([Path("runs")], recorder, stale_seconds=3600, say=lambda line: None)
    watcher.step()
    assert [upload.final for upload, _, _ in recorder.sent] == [False] and not (offline / SYNCED_MARKER).exists()
    hour_ago = time.time() - 3601
    os.utime(next(offline.glob("run-*.wandb")), (hour_ago, hour_ago))
    watcher.step()  # unchanged since the last upload: nothing to resend, only marked as done
    assert len(recorder.sent) == 1 and (offline / SYNCED_MARKER).exists()


def fake_offline_run(root: Path) -> Path:
    folder = root / "digits" / "20261203-000000-abcd" / "wandb" / "offline-run-20261203_000000-abcd1234"
    folder.mkdir(parents=True)
    (folder / "run-abcd1234.wandb").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"NETRC": "/nonexistent"},
            "W&B sync needs an API key for api.wandb.ai: run `wandb login` or set WANDB_API_KEY",
        ),
        (
            {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "https://api.wandb.invalid"},
            "W&B sync cannot reach https://api.wandb.invalid (",
        ),
    ],
    ids=["no key", "no network"],
)
def test_sync_without_a_key_or_a_network_is_one_line(env: dict[str, str], line: str) -> None:
    fake_offline_run(Path("runs"))
    for watch in ([], ["--watch"]):
        result = python_cli("sync", *watch, "runs", env={"NETRC": "/nonexistent", **env})
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
        assert result.stderr.startswith(f"lightscale: error: {line}"), result.stderr


def test_sync_names_a_missing_folder_and_an_empty_one() -> None:
    result = python_cli("sync", "runs/nowhere")
    assert result.returncode == 2
    assert result.stderr.strip() == "lightscale: error: lightscale sync: no such run directory or folder: runs/nowhere"
    Path("empty").mkdir()
    result = python_cli("sync", "empty")
    assert result.stderr.strip() == "lightscale: error: lightscale sync: no offline W&B runs under empty"


def test_the_real_wandb_sync_gives_up_in_one_line_when_the_server_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # wandb sync itself retries for ever against a server that does not answer: the watcher must not hang on it.
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", "runs/offline") == 0
    (run,) = find_offline_runs([Path("runs")])
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    error = upload_with_wandb(Upload(run, 0, final=False), timeout=5)
    assert error == "wandb sync did not finish within 5 s (network?); trying again later"


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_interval_is_one_line(value: str) -> None:
    result = python_cli("sync", "--watch", "--interval", value, "runs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"lightscale sync: error: argument --interval: expected a positive number, got '{value}'"
    )
