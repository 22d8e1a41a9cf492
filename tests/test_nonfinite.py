"""The non-finite guard: a NaN/Inf loss or gradient at a known step stops the run with one line naming that step
(or, configured, skips and counts it), and no checkpoint is ever written from a non-finite state."""

import json
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli, run_dirs
from lightscale.resilience.checkpoint_io import safe_load
from lightscale.resilience.nonfinite import nonfinite_flag

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# 12 steps of 64 images; last.ckpt every 2 steps, so a checkpoint falls right before the NaN
BASE = [
    "fit", "--config", DIGITS, "--config", CSV, *QUIET, "--run.test_after_fit", "false", "--run.report", "false",
    "--model", "helpers.faults.NaNClassifier", "--trainer.max_epochs", "1", "--checkpoint.last_every_n_steps", "2",
    "--trainer.limit_train_batches", "12", "--trainer.limit_val_batches", "2", "--data.batch_size", "64",
]  # fmt: skip


def all_finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())


def checkpoints() -> list[dict]:
    (run_dir,) = run_dirs()
    return [safe_load(p) for p in sorted((run_dir / "checkpoints").glob("*.ckpt"))]


def test_nan_loss_stops_with_one_line_naming_the_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*BASE, "--model.nan_at_steps", "[7]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightscale: error: non-finite loss at global step 7 (loss=nan)")
    assert "no checkpoint was written from this state" in err[0] and "--nonfinite.action skip" in err[0]
    saved = checkpoints()
    assert [c["global_step"] for c in saved] == [6]  # last.ckpt from step 6; nothing at or after the NaN
    assert all(all_finite(c) for c in saved)


def test_nan_gradient_stops_and_on_exception_checkpointing_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*BASE, "--model.nan_at_steps", "[5]", "--model.nan_in", "gradient"]
    args += ["--checkpoint.save_on_exception", "true", "--trainer.callbacks+=OnExceptionCheckpoint"]
    args += ["--trainer.callbacks.dirpath", "on_exception"]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite gradient at global step 5" in err[0], err
    assert [c["global_step"] for c in checkpoints()] == [4]
    assert not Path("on_exception").exists() or not list(Path("on_exception").iterdir())


def test_skip_mode_drops_the_steps_counts_them_and_finishes() -> None:
    assert run_cli(*BASE, "--model.nan_at_steps", "[3,11]", "--nonfinite.action", "skip") == 0
    (run_dir,) = run_dirs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 12 and summary["fit_metrics"]["nonfinite/skipped"] == 2.0
    last = safe_load(run_dir / "checkpoints" / "last.ckpt")
    assert all_finite(last)
    adam_steps = {float(s["step"]) for s in last["optimizer_states"][0]["state"].values()}
    assert adam_steps == {10.0}  # 12 optimizer steps, 2 skipped: AdamW never saw them
    assert last["callbacks"]["NonFiniteGuard"] == {"skipped": 2}  # the count survives a resume


def test_the_flag_needs_no_host_sync_and_sees_every_dtype() -> None:
    tensors = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64)]
    flag = nonfinite_flag(tensors, torch.device("cpu"))
    assert flag.dtype == torch.bool and flag.shape == () and not flag
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in range(3):
            broken = [t.clone() for t in tensors]
            broken[i].view(-1)[0] = bad
            assert nonfinite_flag(broken, torch.device("cpu")), (i, bad)
    assert torch.equal(tensors[0], torch.ones(3))  # checking leaves the values untouched


def test_a_pending_non_finite_flag_blocks_the_next_checkpoint() -> None:
    """The GPU path of ``stop`` reads flags late (no per-step sync); a checkpoint must wait for them."""
    from types import SimpleNamespace

    from lightscale.resilience.nonfinite import NonFiniteError, NonFiniteGuard, _Flag

    guard = NonFiniteGuard("stop")
    trainer = SimpleNamespace(checkpoint_callback=None)
    guard._pending.append(_Flag(41, torch.tensor([0.0, 0.0, 1.0])))
    guard.on_save_checkpoint(trainer, None, {})  # finite: the save goes ahead
    guard._pending.append(_Flag(42, torch.tensor([1.0, 0.0, 2.0])))  # a gradient went non-finite at step 42
    with pytest.raises(NonFiniteError, match="non-finite gradient at global step 42"):
        guard.on_save_checkpoint(trainer, None, {})
    with pytest.raises(NonFiniteError, match="refusing to write a checkpoint"):
        guard.on_save_checkpoint(trainer, None, {})


@pytest.mark.parametrize("loss_shape", [(), (2,)], ids=["host-read path", "device-flag path"])
def test_both_verdict_paths_stop_and_skip_on_a_non_finite_gradient(loss_shape: tuple[int, ...]) -> None:
    """A scalar loss on the CPU takes the guard's host-read path; any other loss (or an accelerator, or DDP)
    the device-flag path. Both must see a NaN gradient, name the step, and skip by dropping the gradients."""
    from types import SimpleNamespace

    from lightscale.resilience.nonfinite import NonFiniteError, NonFiniteGuard

    def trainer() -> SimpleNamespace:
        return SimpleNamespace(
            precision_plugin=SimpleNamespace(), world_size=1, global_step=9, checkpoint_callback=None,
            callback_metrics={}, is_global_zero=True, loggers=[],
        )  # fmt: skip

    def step(guard: NonFiniteGuard, grad_value: float) -> torch.optim.Optimizer:
        module = torch.nn.Linear(3, 1, bias=False)
        module.weight.grad = torch.full((1, 3), grad_value)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        guard.on_before_backward(trainer(), module, torch.ones(loss_shape))
        guard.on_before_optimizer_step(trainer(), module, optimizer)
        return optimizer

    finite = step(NonFiniteGuard("stop"), 1.0)
    assert finite.param_groups[0]["params"][0].grad is not None  # a finite step goes ahead untouched
    with pytest.raises(NonFiniteError, match="non-finite gradient at global step 9"):
        step(NonFiniteGuard("stop"), float("nan"))
    guard = NonFiniteGuard("skip")
    with pytest.warns(UserWarning, match="step skipped"):
        skipped = step(guard, float("inf"))
    assert skipped.param_groups[0]["params"][0].grad is None and guard.skipped == 1
