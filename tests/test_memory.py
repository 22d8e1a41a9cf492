"""Peak memory of every rank in the logs and summary.json; an out-of-memory error as one line that says where."""

import csv
import json
import socket
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli, without_logging_noise

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--run.test_after_fit", "false",
         "--run.report", "false"]  # fmt: skip


def test_the_peak_memory_of_every_rank_is_logged_and_summarised() -> None:
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", "runs/memory") == 0
    summary = json.loads(Path("runs/memory/summary.json").read_text())
    peak = summary["memory"]["rank0"]["peak_rss_gb"]
    assert 0.1 < peak < 64  # a Python process with torch loaded, on a CPU
    assert summary["fit_metrics"]["memory/peak_rss_gb"] == pytest.approx(peak, abs=1e-3)
    with open("runs/memory/metrics.csv", newline="") as file:
        logged = [float(row["memory/peak_rss_gb"]) for row in csv.DictReader(file) if row.get("memory/peak_rss_gb")]
    assert len(logged) == 2 and logged == sorted(logged)  # every validation; a peak never goes down


def test_out_of_memory_is_one_line_with_rank_step_and_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    oom = ["--trainer.callbacks+=helpers.faults.OutOfMemoryAt", "--trainer.callbacks.step=6"]
    args = ["fit", "--config", DIGITS, *SHORT, "--checkpoint.last_every_n_steps", "1", "--run.dir", "runs/oom", *oom]
    assert run_cli(*args) == 2
    lines = without_logging_noise(capsys.readouterr().err)
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1] == (
        f"lightscale: error: out of memory on rank 0 ({socket.gethostname()}) at global step 6: requested 2.00 GiB, "
        "1.20 GiB free of 79.15 GiB"
    )
    summary = json.loads(Path("runs/oom/summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("OutOfMemoryError: CUDA out of memory")
    last = torch.load("runs/oom/checkpoints/last.ckpt", weights_only=True)  # the state before it, intact
    assert last["global_step"] == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_out_of_memory_leaves_the_allocator_history(capsys: pytest.CaptureFixture[str]) -> None:
    oom = ["--trainer.callbacks+=helpers.faults.AllocateTooMuchAt", "--trainer.callbacks.step=3"]
    gpu = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--memory.record_history", "true"]
    assert run_cli("fit", "--config", DIGITS, *SHORT, *gpu, "--run.dir", "runs/cuda-oom", *oom) == 2
    line = without_logging_noise(capsys.readouterr().err)[-1]
    assert line.startswith("lightscale: error: out of memory on rank 0") and "at global step 3: requested" in line
    snapshot = Path("runs/cuda-oom/diagnostics/memory-oom-rank0.pickle")
    assert f"allocator history in {snapshot}" in line and snapshot.stat().st_size > 0
    summary = json.loads(Path("runs/cuda-oom/summary.json").read_text())
    assert summary["status"] == "failed"
