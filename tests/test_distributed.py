"""Distributed runs without SLURM: torchrun (one node, and two "nodes" meeting at a c10d rendezvous on
127.0.0.1) and Lightning's own DDP launcher, all on the CPU with gloo, each in a subprocess.

They must behave as under ``srun``: one run directory and one W&B run per run, every rank trained and ended
with the same weights, and DDP-synced torchmetrics equal to one process on the same data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CONFIGS, free_port, launcher_env, run_together
from helpers.wandb_offline import find_offline_runs, read_offline_run

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CPU = str(CONFIGS / "trainer" / "cpu.yaml")
TINY = [
    "--config", DIGITS, "--config", CPU, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
    "--trainer.limit_val_batches", "2", "--run.test_after_fit", "false", "--run.report", "false",
    "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=helpers.probe.Probe",
]  # fmt: skip


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "lightscale", "fit"]


def check_one_run(root: Path, world_size: int) -> Path:
    """One run directory for the whole job; every rank's final weights equal; one W&B run."""
    dirs = [p for p in (root / "runs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    run_dir = dirs[0]
    files = sorted((run_dir / "probe").glob("weights-rank*.pt"))
    weights = [torch.load(f, weights_only=True) for f in files]
    assert len(weights) == world_size and {w["world_size"] for w in weights} == {world_size}
    for other in weights[1:]:
        for name, tensor in weights[0]["weights"].items():
            assert torch.equal(tensor, other["weights"][name]), name
    runs = [read_offline_run(p) for p in find_offline_runs(run_dir)]
    assert [r.run_id for r in runs] == [(run_dir / "wandb-run-id").read_text().strip()]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == world_size
    return run_dir


@pytest.mark.slow
def test_torchrun_standalone_two_processes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*torchrun("--standalone", "--nproc_per_node", "2"), *TINY, "--trainer.devices", "2"],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = check_one_run(tmp_path, world_size=2)
    assert run_dir.name.startswith("torchrun-")


@pytest.mark.slow
def test_torchrun_two_nodes_rendezvous(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes", one process each) meet at a c10d rendezvous on 127.0.0.1."""
    port, rdzv_id = free_port(), f"ls-{uuid.uuid4().hex[:8]}"
    common = [
        "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", rdzv_id, "--local-addr", "127.0.0.1",
    ]  # fmt: skip
    fit = [*TINY, "--trainer.num_nodes", "2", "--trainer.devices", "1"]
    run_together(tmp_path, *([*torchrun(*common, "--node_rank", str(rank)), *fit] for rank in (0, 1)))
    run_dir = check_one_run(tmp_path, world_size=2)
    assert run_dir.name == f"torchrun-{rdzv_id}"


@pytest.mark.slow
def test_ddp_metrics_equal_single_process(tmp_path: Path) -> None:
    """Lightning's DDP launcher, 2 CPU processes, evaluating a checkpoint: test accuracy, F1 and loss equal one
    process on the same 270 test images. 270 splits evenly over 2 ranks, so DistributedSampler adds no padded
    duplicates; torchmetrics syncs its states (counts) across ranks before computing, and the loss is a
    sync_dist mean of equal-sized rank means, i.e. the global mean."""
    train = subprocess.run(
        [sys.executable, "-m", "lightscale", "fit", *TINY, "--run.name", "train"],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    (ckpt,) = (tmp_path / "runs" / "train").glob("*/checkpoints/last.ckpt")

    def evaluate(name: str, *extra: str) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "lightscale", "test", "--config", DIGITS, "--config", CPU, "--run.report", "false",
             "--trainer.enable_progress_bar", "false", "--run.name", name, "--ckpt_path", str(ckpt), *extra],
            cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = (tmp_path / "runs" / name).iterdir()  # one run directory per run, DDP included
        assert len(find_offline_runs(run_dir)) == 1  # and one W&B run (rank 0 only)
        result = json.loads((run_dir / "summary.json").read_text())
        return {"world_size": result["world_size"], **result["test_metrics"]}

    one = evaluate("one")
    two = evaluate("two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["test/acc"] == pytest.approx(one["test/acc"], abs=1e-7)
    assert two["test/f1"] == pytest.approx(one["test/f1"], abs=1e-6)
    assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-5)
    assert 0.1 < one["test/acc"] < 1.0  # a real, partly trained model: not a degenerate all-equal case
