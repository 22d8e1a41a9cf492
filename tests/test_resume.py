"""Exact resume: a run interrupted at any step and resumed ends bit-identical to an uninterrupted one.

Fast tests (default suite) interrupt a run in this process and resume it; the slow ones kill ``python -m
lightscale fit`` with SIGKILL at a random mid-epoch step (digits with 0 and 2 workers, the tiny GPT, a 2-process
DDP run) and resume it with ``--ckpt_path auto``.
"""

import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping

from conftest import CONFIGS, run_cli
from helpers.resume import (
    assert_same,
    assert_same_final_state,
    kill_at_marker,
    pause_callback_args,
    pick_kill_step,
    start,
    trial_env,
    wait,
)
from lightscale.callbacks import Checkpoint
from lightscale.data import DigitsDataModule
from lightscale.models import Classifier
from lightscale.resilience.checkpoint_io import SafeCheckpointIO
from lightscale.resilience.exact_resume import ExactResume
from lightscale.resilience.resume import find_candidates, resolve_resume_path
from lightscale.resilience.worker_rng import WorkerRNG

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
FAST = ["--run.test_after_fit", "false", "--run.report", "false", *QUIET]


# --------------------------------------------------------------------------------------- in-process resume
class Crash(Exception):
    pass


class CrashAt(L.Callback):
    """Raise at the end of optimizer step ``step``, before that step's checkpoints (like a crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise Crash


def fit_digits(run_dir: Path, ckpt_path: str | None = None, crash_at: int | None = None, workers: int = 0) -> None:
    """2 epochs x 10 steps of the digits classifier (dropout on: the RNG matters), last.ckpt every 4 steps."""
    L.seed_everything(42, workers=True)
    callbacks: list[L.Callback] = [
        ExactResume(),
        EarlyStopping(monitor="val/loss", mode="min", patience=8, strict=False),
        Checkpoint(dirpath=run_dir / "checkpoints", monitor="val/loss", save_last=True, last_every_n_steps=4),
    ]
    if crash_at is not None:
        callbacks.insert(0, CrashAt(crash_at))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=2,
        deterministic=True,
        gradient_clip_val=1.0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
    )
    trainer.fit(Classifier(), DigitsDataModule(batch_size=128, num_workers=workers), ckpt_path=ckpt_path)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    fit_digits(run_dir)
    return run_dir


# crash inside epoch 1 (resume mid-epoch from step 12) / right after epoch 0 (resume from its end, step 10)
@pytest.mark.parametrize(("crash_at", "resumed_at"), [(15, 12), (11, 10)])
def test_interrupted_run_resumes_bit_identically(
    tmp_path: Path, reference_run: Path, crash_at: int, resumed_at: int
) -> None:
    with pytest.raises(Crash):
        fit_digits(tmp_path, crash_at=crash_at)
    resume_from = resolve_resume_path(tmp_path, "auto")
    assert resume_from == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(resume_from, weights_only=True)["global_step"] == resumed_at
    fit_digits(tmp_path, ckpt_path=str(resume_from))
    assert assert_same_final_state(reference_run, tmp_path) > 20


# --------------------------------------------------------------------------------------- last.ckpt cadence
class WorseningModel(L.LightningModule):
    """Logs a validation loss that gets worse every epoch, so 'best' never changes after epoch 0."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(40, 4), batch_size=4)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4)


def test_last_checkpoint_is_refreshed_every_validation_and_every_n_steps(tmp_path: Path) -> None:
    saved_steps: list[int] = []

    class Spy(SafeCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: object, storage_options: object = None) -> None:
            if Path(str(path)).name == "last.ckpt":
                saved_steps.append(checkpoint["global_step"])
            super().save_checkpoint(checkpoint, path, storage_options)

    callback = Checkpoint(dirpath=tmp_path, monitor="val/loss", save_last=True, save_top_k=1, last_every_n_steps=4)
    trainer = L.Trainer(
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        plugins=[Spy()],
    )
    trainer.fit(WorseningModel())
    # 10 steps per epoch: refreshes every 4 steps (20 also before its validation, in case that crashes) and one
    # after every validation (10, 20, 30); plain Lightning 2.6 writes last.ckpt only together with a new best
    # (after epoch 0 here), so it would stay at step 10
    assert saved_steps == [4, 8, 10, 12, 16, 20, 20, 24, 28, 30]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 30
    assert len(list(tmp_path.glob("*.ckpt"))) == 2  # best-k (k=1) and last: older ones pruned


# --------------------------------------------------------------------------------------- --ckpt_path auto
def save_fake_checkpoint(path: Path, step: int, mtime: float, **extra: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "loops": {}, "global_step": step, **extra}, path)
    os.utime(path, (mtime, mtime))


def test_auto_picks_the_newest_valid_checkpoint_and_reports_damaged_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    save_fake_checkpoint(run / "checkpoints" / "best-0-10.ckpt", 10, 1000)
    save_fake_checkpoint(run / "hpc_ckpt_1.ckpt", 20, 2000)
    save_fake_checkpoint(run / "checkpoints" / "last.ckpt", 30, 3000)
    (run / "checkpoints" / ".last.ckpt.1234.tmp").write_bytes(b"partial")  # left by a kill mid-write
    assert resolve_resume_path(run) == run / "checkpoints" / "last.ckpt"
    assert not (run / "checkpoints" / ".last.ckpt.1234.tmp").exists()

    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    (run / "checkpoints" / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    os.utime(run / "checkpoints" / "last.ckpt", (3000, 3000))
    capsys.readouterr()
    assert resolve_resume_path(run) == run / "hpc_ckpt_1.ckpt"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "last.ckpt is truncated or corrupt" in err[0], err  # one line per skipped file
    assert err[1].startswith("lightscale: resuming from") and err[1].endswith("hpc_ckpt_1.ckpt")

    torch.save({"state_dict": {}}, run / "hpc_ckpt_1.ckpt")  # weights only: cannot resume
    os.utime(run / "hpc_ckpt_1.ckpt", (2000, 2000))
    assert resolve_resume_path(run) == run / "checkpoints" / "best-0-10.ckpt"
    # the unusable hpc checkpoint is renamed aside, so Lightning's own SLURM lookup cannot pick it either
    assert [c.path.name for c in find_candidates(run)] == ["last.ckpt", "best-0-10.ckpt"]
    assert (run / "invalid-hpc-ckpt-1.ckpt").is_file()


def test_auto_starts_fresh_without_checkpoints(tmp_path: Path) -> None:
    assert resolve_resume_path(tmp_path / "never-ran") is None
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    assert resolve_resume_path(tmp_path / "empty") is None


def test_cli_auto_resumes_in_the_run_directory_and_starts_fresh_when_empty(capsys: pytest.CaptureFixture) -> None:
    args = ["fit", "--config", DIGITS, "--config", CSV, *FAST, "--model.scheduler", "null", "--run.dir", "runs/r"]
    args += ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1"]
    assert run_cli(*args, "--trainer.max_epochs", "1", "--ckpt_path", "auto") == 0  # nothing to resume: fresh
    assert torch.load("runs/r/checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    capsys.readouterr()
    assert run_cli(*args, "--trainer.max_epochs", "2", "--ckpt_path", "auto") == 0
    out = capsys.readouterr()
    assert "resuming from runs/r/checkpoints/last.ckpt" in out.out + out.err
    assert torch.load("runs/r/checkpoints/last.ckpt", weights_only=True)["global_step"] == 6  # 3 more steps


# --------------------------------------------------------------------------------------- kill -9 trials
DIGITS_TRIAL = [
    "fit", "--config", DIGITS, "--config", CSV, *FAST,
    "--trainer.max_epochs", "3", "--data.batch_size", "128", "--trainer.deterministic", "true",
    "--checkpoint.last_every_n_steps", "4",
]  # fmt: skip


def kill_and_resume_trial(tmp_path: Path, args: list[str], total: int, per_epoch: int, every: int) -> int:
    """Reference run and killed run side by side, then the resume; returns the number of tensors compared."""
    step = pick_kill_step(total, per_epoch, every)
    marker = tmp_path / "paused"
    ref = start([*args, "--run.dir", str(tmp_path / "ref")], tmp_path / "ref.log")
    killed = start([*args, "--run.dir", str(tmp_path / "res"), *pause_callback_args(step, marker)], tmp_path / "k.log")
    kill_at_marker(killed, marker, tmp_path / "k.log")
    assert torch.load(tmp_path / "res" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < step
    resumed = start([*args, "--run.dir", str(tmp_path / "res"), "--ckpt_path", "auto"], tmp_path / "res.log")
    wait(ref, tmp_path / "ref.log")
    wait(resumed, tmp_path / "res.log")
    assert "resuming from" in (tmp_path / "res.log").read_text()
    return assert_same_final_state(tmp_path / "ref", tmp_path / "res")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_9_digits(tmp_path: Path, workers: int) -> None:
    args = [*DIGITS_TRIAL, "--data.num_workers", str(workers)]
    assert kill_and_resume_trial(tmp_path, args, total=30, per_epoch=10, every=4) > 50


@pytest.mark.slow
def test_kill_9_tiny_gpt(tmp_path: Path) -> None:
    args = [
        "fit", "--config", str(CONFIGS / "experiment" / "gpt-cpu.yaml"), "--config", CSV, *FAST,
        "--data.max_bytes", "100000", "--data.cache_dir", str(tmp_path / "tokens"),
        "--data.block_size", "32", "--data.batch_size", "8", "--data.train_samples_per_epoch", "80",
        "--data.val_batches", "2", "--model.block_size", "32", "--model.n_layer", "2", "--model.n_head", "2",
        "--model.n_embd", "32", "--model.dropout", "0.1", "--model.scheduler.warmup_steps", "5",
        "--model.sample_prompt", "null",
        "--trainer.max_steps", "30", "--trainer.val_check_interval", "10", "--trainer.deterministic", "true",
        "--checkpoint.last_every_n_steps", "4",
    ]  # fmt: skip
    assert kill_and_resume_trial(tmp_path, args, total=30, per_epoch=10, every=4) > 20


@pytest.mark.slow
def test_kill_9_ddp_two_processes(tmp_path: Path) -> None:
    args = [
        *DIGITS_TRIAL[:-4], "--trainer.max_epochs", "4", "--checkpoint.last_every_n_steps", "3",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    # 1259 images / 2 ranks / 128 per batch: 5 steps per epoch
    assert kill_and_resume_trial(tmp_path, args, total=20, per_epoch=5, every=3) > 50


def test_trial_helpers_compare_bit_for_bit() -> None:
    assert assert_same({"a": torch.ones(2), "b": [1, "x"]}, {"a": torch.ones(2), "b": [1, "x"]}) == 1
    with pytest.raises(AssertionError, match="differs"):
        assert_same({"a": torch.ones(2)}, {"a": torch.ones(2) + 1e-7})
    assert trial_env()["OMP_NUM_THREADS"] == "1"
    assert shutil.which("kill") or True


def test_a_requeued_slurm_job_without_ckpt_path_resumes_like_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning alone would take hpc_ckpt_1.ckpt (by its number, unopened); the newer last.ckpt wins here."""
    from jsonargparse import Namespace

    import lightscale.cli.checkpoints as checkpoints

    save_fake_checkpoint(tmp_path / "hpc_ckpt_1.ckpt", 20, 2000)
    save_fake_checkpoint(tmp_path / "checkpoints" / "last.ckpt", 30, 3000)
    config = Namespace(ckpt_path=None)
    monkeypatch.setattr(checkpoints.SLURMEnvironment, "detect", staticmethod(lambda: True))
    checkpoints.resolve_checkpoint("fit", config, tmp_path, torch.nn.Module())
    assert config.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(checkpoints.SLURMEnvironment, "detect", staticmethod(lambda: False))
    config.ckpt_path = None
    checkpoints.resolve_checkpoint("fit", config, tmp_path, torch.nn.Module())
    assert config.ckpt_path is None  # outside SLURM: no implicit resume


def test_last_checkpoint_is_refreshed_every_m_minutes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightscale.resilience.checkpoint as checkpoint_module

    clock = {"now": 0.0}

    class Clock(L.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            clock["now"] += 60.0  # every training step takes a minute

    monkeypatch.setattr(checkpoint_module.time, "monotonic", lambda: clock["now"])
    saved_steps: list[int] = []

    class Spy(SafeCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: object, storage_options: object = None) -> None:
            saved_steps.append(checkpoint["global_step"])
            super().save_checkpoint(checkpoint, path, storage_options)

    callback = Checkpoint(dirpath=tmp_path, monitor=None, save_top_k=0, save_last=True, last_every_minutes=3)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Clock(), callback], plugins=[Spy()], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(WorseningModel())
    assert saved_steps == [3, 6, 9, 10]  # every 3 minutes of training, and at the end of the epoch


class Augmented(torch.utils.data.Dataset):
    """Random 'augmentation' drawn in the DataLoader worker from its global generators."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        import random

        import numpy as np

        return torch.tensor([index, torch.rand(()).item(), np.random.rand(), random.random()])


class ResumableAugmented(WorkerRNG, Augmented):
    pass


@pytest.mark.parametrize("dataset_class", [ResumableAugmented, Augmented])
def test_worker_random_streams_resume_exactly_with_worker_rng(dataset_class: type) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader() -> StatefulDataLoader:
        torch.manual_seed(0)
        return StatefulDataLoader(dataset_class(), batch_size=4, shuffle=True, num_workers=2)

    first = loader()
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    expected = [next(iterator) for _ in range(6)]
    resumed = loader()
    resumed.load_state_dict(state)
    iterator = iter(resumed)
    got = [next(iterator) for _ in range(6)]
    assert all(torch.equal(a[:, 0], b[:, 0]) for a, b in zip(expected, got, strict=True))  # same samples
    same_draws = all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert same_draws is (dataset_class is ResumableAugmented)  # without WorkerRNG the workers start over
