"""Checkpoints that cannot be corrupted: atomic writes (also under kill -9), weights-only loads that refuse
pickled code, one-line errors for damaged files, pruning only after the new file is on disk."""

import errno
import os
import random
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from conftest import CONFIGS, run_cli
from lightscale.callbacks import Checkpoint
from lightscale.cli.checkpoints import install_checkpoint_io
from lightscale.resilience.checkpoint_io import CheckpointError, SafeCheckpointIO, atomic_save, safe_load
from lightscale.resilience.resume import resolve_resume_path

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")


def write_forever(path: Path, weights: torch.Tensor) -> None:
    """Child process body: save checkpoints to ``path`` until killed."""
    torch.set_num_threads(1)
    io, i = SafeCheckpointIO(), 0
    while True:
        i += 1
        io.save_checkpoint({"i": i, "w": weights}, path)


def test_kill_9_during_writes_never_leaves_a_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    weights = torch.arange(6_000_000, dtype=torch.float32)  # 24 MB per write
    SafeCheckpointIO().save_checkpoint({"i": 0, "w": weights}, path)
    leftovers = 0
    rng = random.Random(0)
    for _ in range(8):
        pid = os.fork()  # a writer without a fresh interpreter start (importing lightning takes seconds)
        if pid == 0:
            try:
                write_forever(path, weights)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(pid, signal.SIGKILL)  # lands anywhere: mid-write, mid-rename, between writes
        os.waitpid(pid, 0)
        checkpoint = safe_load(path)  # never truncated: the old file or the new one, complete
        assert torch.equal(checkpoint["w"], weights)
        leftovers += len(list(tmp_path.glob(".last.ckpt.*.tmp")))
        for tmp in tmp_path.glob(".last.ckpt.*.tmp"):
            tmp.unlink()
    assert leftovers > 0, "no kill landed during a write; the test proved nothing"


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"step": 1}, path)

    def disk_full(obj: object, f: object) -> None:
        f.write(b"PK partial")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint is intact"):
        SafeCheckpointIO().save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_atomic_save_respects_the_umask(tmp_path: Path) -> None:
    atomic_save({"a": 1}, tmp_path / "x.ckpt")
    old = os.umask(0)
    os.umask(old)
    assert (tmp_path / "x.ckpt").stat().st_mode & 0o777 == 0o666 & ~old


class Evil:
    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {Path.cwd() / 'pwned'}",))


def write_malicious(path: Path) -> Path:
    torch.save({"state_dict": {}, "loops": {}, "payload": Evil()}, path)
    return path


def test_malicious_checkpoint_is_refused_not_executed(tmp_path: Path) -> None:
    path = write_malicious(tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as error:
        safe_load(path)
    message = str(error.value)
    assert "\n" not in message and "evil.ckpt" in message and "system" in message and "could run code" in message
    assert not Path("pwned").exists()
    with pytest.raises(CheckpointError):
        SafeCheckpointIO().load_checkpoint(path)
    assert not Path("pwned").exists()


def test_cli_refuses_a_malicious_ckpt_path_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    write_malicious(Path("evil.ckpt"))
    assert run_cli("fit", "--config", DIGITS, "--ckpt_path", "evil.ckpt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightscale: error: refused to load checkpoint evil.ckpt"), err
    assert not Path("pwned").exists() and not Path("runs").exists()


def test_cli_reports_a_truncated_or_missing_ckpt_path_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"state_dict": {"w": torch.ones(1000)}, "loops": {}}, "good.ckpt")
    Path("cut.ckpt").write_bytes(Path("good.ckpt").read_bytes()[:500])
    assert run_cli("fit", "--config", DIGITS, "--ckpt_path", "cut.ckpt") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "checkpoint cut.ckpt is truncated or corrupt" in err[0]
    assert run_cli("fit", "--config", DIGITS, "--ckpt_path", "nope.ckpt") == 2
    assert "checkpoint nope.ckpt (--ckpt_path) does not exist" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_auto_skips_a_malicious_last_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "checkpoints").mkdir()
    write_malicious(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_resume_path(tmp_path) is None  # nothing else valid: fresh start
    err = capsys.readouterr().err
    assert "skipping refused to load checkpoint" in err and not Path("pwned").exists()


def test_safe_load_accepts_the_plain_data_real_checkpoints_hold(tmp_path: Path) -> None:
    import numpy as np

    data = {"hparams": {"lr": 0.1, "path": Path("/data")}, "arr": np.arange(3), "x": np.float64(1.5)}
    torch.save(data, tmp_path / "ok.ckpt")
    loaded = safe_load(tmp_path / "ok.ckpt")
    assert loaded["hparams"]["path"] == Path("/data") and loaded["arr"].tolist() == [0, 1, 2] and loaded["x"] == 1.5


# --------------------------------------------------------------------------------------------- retention
class TinyModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", 10.0 - self.current_epoch)  # improves every epoch: a new best each time

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(12, 4), batch_size=4)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=4)


def test_old_checkpoints_are_pruned_only_after_the_new_one_is_on_disk(tmp_path: Path) -> None:
    events: list[tuple[str, str]] = []

    class Recorder(SafeCheckpointIO):
        def save_checkpoint(self, checkpoint: dict, path: object, storage_options: object = None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            events.append(("saved", Path(str(path)).name))

        def remove_checkpoint(self, path: object) -> None:
            # at the moment of pruning, every checkpoint saved so far except this one is complete on disk
            for kind, name in events:
                if kind == "saved" and name != Path(str(path)).name and (tmp_path / name).exists():
                    safe_load(tmp_path / name)
            events.append(("removed", Path(str(path)).name))
            super().remove_checkpoint(path)

    callback = Checkpoint(
        dirpath=tmp_path,
        monitor="val/loss",
        save_top_k=2,
        save_last=True,
        filename="best-{epoch}",
        auto_insert_metric_name=False,
    )
    trainer = L.Trainer(
        max_epochs=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback], plugins=[Recorder()],
    )  # fmt: skip
    trainer.fit(TinyModel())
    removed = [name for kind, name in events if kind == "removed"]
    assert removed == ["best-0.ckpt", "best-1.ckpt"]  # top-2 kept
    for name in removed:  # each pruned only after the checkpoint that displaced it was saved
        displaced_at = events.index(("removed", name))
        newer = {"best-0.ckpt": "best-2.ckpt", "best-1.ckpt": "best-3.ckpt"}[name]
        assert events.index(("saved", newer)) < displaced_at
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-2.ckpt", "best-3.ckpt", "last.ckpt"]


# --------------------------------------------------------------------------------------------- installation
def test_the_cli_installs_safe_checkpoint_io_unless_one_is_configured() -> None:
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    install_checkpoint_io(trainer)
    assert type(trainer.strategy.checkpoint_io) is SafeCheckpointIO

    wrapped = L.Trainer(logger=False, enable_progress_bar=False, plugins=[AsyncCheckpointIO()])
    install_checkpoint_io(wrapped)
    assert isinstance(wrapped.strategy.checkpoint_io, AsyncCheckpointIO)
    assert type(wrapped.strategy.checkpoint_io.checkpoint_io) is SafeCheckpointIO

    class Mine(TorchCheckpointIO):
        pass

    custom = L.Trainer(logger=False, enable_progress_bar=False, plugins=[Mine()])
    install_checkpoint_io(custom)
    assert type(custom.strategy.checkpoint_io) is Mine

    from lightscale.cli import LightscaleCLI

    cli = LightscaleCLI(args=["--config", DIGITS], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is SafeCheckpointIO
