"""Per-epoch wall time and peak GPU memory: the two numbers that say whether a run will fit its time limit and
its GPU, logged next to the metrics so they can be compared across runs."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

GB = 1e9


class EpochStats(Callback):
    """Logs ``time/epoch_seconds`` (the training epoch including its validation) and, on CUDA,
    ``memory/peak_gb`` / ``memory/peak_reserved_gb`` (peak allocated / reserved by PyTorch's allocator on this
    rank during the epoch, in 10^9 bytes) at the end of every training epoch. Costs nothing per step."""

    def __init__(self) -> None:
        self._start: float | None = None

    def _cuda_device(self, trainer: L.Trainer) -> torch.device | None:
        device = trainer.strategy.root_device
        return device if device.type == "cuda" else None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        device = self._cuda_device(trainer)
        if device is not None:
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is None:
            return
        metrics = {"time/epoch_seconds": time.perf_counter() - self._start}
        self._start = None
        device = self._cuda_device(trainer)
        if device is not None:
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
            metrics["memory/peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=max(trainer.global_step - 1, 0))
