"""Resume on other hardware: a sharded checkpoint written by 2 processes under FSDP2 continues on 1 process, under
``ModelParallelStrategy`` (data_parallel_size 1: DCP reshards while loading) and under the plain single-device
strategy (the folder is consolidated, weights-only, by ``SafeCheckpointIO``), with the loss of every later step
equal to the uninterrupted 2-process run's.

The global batch is the same: 2 processes x 4 windows, 1 process x 8. ``WindowSampler`` deals an epoch's window
ids to the ranks round-robin, so step ``s`` of either layout trains on the same 8 windows (checked through the
per-step batch checksums); the resumed loader fast-forwards by whole batches of its own size. The run crosses an
epoch end after the resume (8 steps per epoch, resumed at step 6 of 12). Dropout is 0: the per-process random
generators cannot carry over to another world size, and the run says so in one line.

Tolerance: the same arithmetic in another order (FSDP2 reduce-scatters gradients across 2 processes; one process
sums them whole), fp32; measured differences are ~1e-7 relative, the bound 1e-5.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, launcher_env

LOSS_RTOL = 1e-5
COMMON = [
    "--config", str(CONFIGS / "experiment" / "gpt-cpu.yaml"), "--config", str(CONFIGS / "logger" / "csv.yaml"),
    "--data.max_bytes", "200000", "--data.train_samples_per_epoch", "64", "--data.block_size", "32",
    "--data.val_batches", "2", "--model.block_size", "32", "--model.n_layer", "2", "--model.n_head", "2",
    "--model.n_embd", "32", "--model.scheduler.warmup_steps", "3", "--model.max_new_tokens", "4",
    "--trainer.max_steps", "12", "--trainer.val_check_interval", "6", "--trainer.accelerator", "cpu",
    "--checkpoint.save_top_k", "-1", "--trainer.enable_progress_bar", "false", "--run.report", "false",
    "--run.test_after_fit", "false", "--trainer.callbacks+=helpers.probe.Probe", "--trainer.callbacks.losses", "true",
    "--trainer.callbacks.trace", "true",
]  # fmt: skip
TWO_PROCESSES = ["--config", str(CONFIGS / "trainer" / "fsdp.yaml"), "--data.batch_size", "4"]
ONE_PROCESS = {
    "model_parallel": [
        "--config", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.devices", "1",
        "--trainer.strategy.init_args.data_parallel_size", "1", "--data.batch_size", "8",
    ],
    "single_device": ["--trainer.devices", "1", "--data.batch_size", "8"],
}  # fmt: skip


def fit(root: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "lightscale", "fit", *COMMON, "--data.cache_dir", str(root / "tokens"),
         "--run.dir", str(run_dir), *args],
        cwd=root, env=launcher_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def per_step(run_dir: Path, world_size: int) -> tuple[dict[int, float], dict[int, float]]:
    """Global loss (mean of the ranks' equal shares) and global batch checksum of every step, by step."""
    losses: dict[int, list[float]] = {}
    sums: dict[int, list[float]] = {}
    for rank in range(world_size):
        for line in (run_dir / "probe" / f"loss-rank{rank}.txt").read_text().splitlines():
            step, loss = line.split()
            losses.setdefault(int(step), []).append(float(loss))
        for line in (run_dir / "probe" / f"trace-rank{rank}.txt").read_text().splitlines():
            step, _, data = line.split(" ", 2)
            sums.setdefault(int(step), []).append(float(data.split("]")[0].strip("[")))
    assert all(len(v) == world_size for v in losses.values())
    return {s: sum(v) / world_size for s, v in losses.items()}, {s: sum(v) for s, v in sums.items()}


def test_window_sampler_gives_every_world_size_the_same_global_batches() -> None:
    from lightscale.data.windows import WindowSampler

    dataset = list(range(64))
    for epoch in (0, 3):
        one = WindowSampler(dataset, 1, 0)
        one.set_epoch(epoch)
        batches = [list(one)[s * 8 : (s + 1) * 8] for s in range(8)]  # 1 process x 8
        for world in (2, 4):
            ranks = [WindowSampler(dataset, world, r) for r in range(world)]
            for sampler in ranks:
                sampler.set_epoch(epoch)
            per_rank = [list(sampler) for sampler in ranks]
            b = 8 // world  # world processes x b: the same global batch
            for step, batch in enumerate(batches):
                assert sorted(i for ids in per_rank for i in ids[step * b : (step + 1) * b]) == batch


def test_loader_position_is_rescaled_to_the_new_world_size() -> None:
    from lightscale.resilience.exact_resume import rescale_loader_states

    saved = [{"_sampler_iter_state": {"samples_yielded": 24}, "_num_yielded": 6}, {"other": 1}]
    assert rescale_loader_states(saved, 2, 1) == [
        {"_sampler_iter_state": {"samples_yielded": 48}, "_num_yielded": 6}, {"other": 1},
    ]  # fmt: skip
    assert rescale_loader_states(saved, 2, 4)[0]["_sampler_iter_state"] == {"samples_yielded": 12}
    assert saved[0]["_sampler_iter_state"]["samples_yielded"] == 24  # the checkpoint's own dict is left alone


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """12 steps on 2 processes (FSDP2), a sharded checkpoint at step 6 (mid-epoch) kept."""
    root = tmp_path_factory.mktemp("reshard")
    run_dir = root / "runs" / "two"
    fit(root, run_dir, *TWO_PROCESSES)
    return root, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["model_parallel", "single_device"])
def test_two_process_fsdp2_checkpoint_resumes_on_one_process(uninterrupted: tuple[Path, Path], layout: str) -> None:
    root, reference = uninterrupted
    (checkpoint,) = (reference / "checkpoints").glob("best-0-6.ckpt")
    assert (checkpoint / "meta.pt").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank
    run_dir = root / "runs" / layout
    result = fit(root, run_dir, *ONE_PROCESS[layout], "--ckpt_path", str(checkpoint))
    assert "resuming a 2-process checkpoint on 1 process(es)" in result.stderr  # the one-line warning

    expected_loss, expected_data = per_step(reference, world_size=2)
    loss, data = per_step(run_dir, world_size=1)
    # the probe records the batch at its start (steps 6..11) and the loss at its end (global_step 7..12)
    assert sorted(data) == list(range(6, 12)) and sorted(loss) == list(range(7, 13))
    for step in range(6, 12):
        assert data[step] == expected_data[step], step  # the same 8 windows, across the epoch end at step 8
    for step in range(7, 13):
        assert loss[step] == pytest.approx(expected_loss[step], rel=LOSS_RTOL), step


@pytest.mark.slow
def test_fsdp2_x_tp_checkpoint_resumes_under_fsdp2_on_fewer_processes(tmp_path: Path) -> None:
    """4 processes as 2 data replicas x 2 tensor-parallel ranks, resumed as 2 FSDP2 processes: the same 2 data
    replicas (batch 4 each), the weights resharded from (data_parallel, tensor_parallel) to data_parallel only."""
    reference = tmp_path / "runs" / "fsdp-tp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    result = subprocess.run(
        [*torchrun, "-m", "lightscale", "fit", *COMMON, "--data.cache_dir", str(tmp_path / "tokens"),
         "--run.dir", str(reference), "--config", str(CONFIGS / "trainer" / "fsdp-tp.yaml"), "--data.batch_size", "4"],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (checkpoint,) = (reference / "checkpoints").glob("best-0-6.ckpt")
    assert len(list(checkpoint.glob("*.distcp"))) == 4  # one shard per process
    run_dir = tmp_path / "runs" / "fsdp"
    resumed = fit(tmp_path, run_dir, *TWO_PROCESSES, "--ckpt_path", str(checkpoint))
    assert "resuming a 4-process checkpoint on 2 process(es)" in resumed.stderr

    expected_loss, expected_data = per_step(reference, world_size=4)
    loss, data = per_step(run_dir, world_size=2)
    assert sorted(loss) == list(range(7, 13))
    for step in range(6, 12):  # each tensor-parallel pair reads its replica's batch: every window counted twice
        assert data[step] * 2 == pytest.approx(expected_data[step], rel=1e-12), step
    for step in range(7, 13):
        assert loss[step] == pytest.approx(expected_loss[step], rel=LOSS_RTOL), step
