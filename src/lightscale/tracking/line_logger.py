"""Plain one-line progress logs for batch jobs, where a progress bar is noise in the log file.

In a SLURM output file a progress bar becomes thousands of carriage returns or repeated lines; what a person
wants there is a line every so often that can be read, grepped and tailed::

    [13:15:31] epoch 1/19 step 40/400 (10%) | train/loss 0.4063 | lr 2.98e-03 | 311 samples/s | eta 0:01:02
    [13:15:33] epoch 1/19 validation (step 40) | val/loss 0.1602 | val/acc 0.9519 | val/f1 0.9509
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback

from lightscale.core import fmt
from lightscale.tracking.batches import batch_size_of


class LineLogger(Callback):
    """Prints (rank 0, flushed) a line every ``every_n_steps`` optimizer steps with epoch, step, train loss,
    learning rate, samples/s and the time left, and one line per validation with its metrics.

    Args:
        every_n_steps: steps between lines; default: the Trainer's ``log_every_n_steps``.
        max_metrics: at most this many validation metrics per line (``val/loss`` first).
    """

    def __init__(self, every_n_steps: PositiveInt | None = None, max_metrics: PositiveInt = 6) -> None:
        self.every_n_steps = every_n_steps
        self.max_metrics = max_metrics
        self._last_step = -1
        self._samples = 0
        self._mark: tuple[float, int] | None = None

    def _print(self, trainer: L.Trainer, message: str) -> None:
        if trainer.is_global_zero:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def _epoch(self, trainer: L.Trainer) -> str:
        # 0-based like the logged ``epoch`` and Lightning's progress bar: "epoch 2/2" is the last of 3
        total = f"/{trainer.max_epochs - 1}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        return f"epoch {trainer.current_epoch}{total}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples = 0
        self._mark = None
        self._start_step = trainer.global_step
        self._start_time = time.perf_counter()
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += batch_size_of(batch)
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        if step == self._last_step or step % every:
            return
        self._last_step = step
        now = time.perf_counter()
        parts = [self._epoch(trainer) + self._steps(step)]
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get("train/loss"))
        if loss is not None:
            parts.append(f"train/loss {fmt.number(float(loss))}")
        shown = {"train/loss_step", "train/loss"}
        for name, value in trainer.progress_bar_metrics.items():  # what the model logs with prog_bar=True
            if name not in shown and not name.startswith(("val/", "test/")) and isinstance(value, (int, float)):
                parts.append(f"{name} {fmt.number(float(value))}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        if self._mark is not None and now > self._mark[0]:
            rate = (self._samples - self._mark[1]) * trainer.world_size / (now - self._mark[0])
            parts.append(f"{rate:,.0f} samples/s")
        tokens = trainer.callback_metrics.get("throughput/tokens_per_sec")  # from ThroughputLogger, if present
        if tokens is not None:
            parts.append(f"{float(tokens):,.0f} tokens/s")
        if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
            parts.append(f"{torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 1e9:.1f} GB peak")
        done = step - self._start_step
        if self._total_steps and done > 0:
            left = (now - self._start_time) / done * (self._total_steps - step)
            parts.append(f"eta {fmt.duration(left)}")
        self._mark = (now, self._samples)
        self._print(trainer, " | ".join(parts))

    def _steps(self, step: int) -> str:
        if not self._total_steps:
            return f" step {step}"
        return f" step {step}/{self._total_steps} ({step / self._total_steps:.0%})"

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        names = sorted(metrics, key=lambda k: (k != "val/loss", k))[: self.max_metrics]
        values = [f"{name} {fmt.number(float(metrics[name]))}" for name in names if metrics[name].numel() == 1]
        where = self._epoch(trainer) if trainer.state.fn == "fit" else "validate"
        self._print(trainer, " | ".join([f"{where} validation (step {trainer.global_step})", *values]))
        self._mark = None  # validation time is not training throughput

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        values = [f"{k} {fmt.number(float(v))}" for k, v in sorted(metrics.items()) if v.numel() == 1]
        self._print(trainer, " | ".join(["test", *values]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - getattr(self, "_start_time", time.perf_counter())
        self._print(trainer, f"training done: {trainer.global_step} steps, {fmt.duration(elapsed)}")
