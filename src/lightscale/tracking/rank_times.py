"""How long each rank waits for its batches and spends in its forward, compared across ranks, so that a slow rank
shows on the dashboard before it turns into a hang.

Under data parallelism every rank's step ends at the same moment (a collective waits for the slowest), so whole
step times cannot tell the ranks apart. The wait for the next batch can: it lies between two batches, where no
collective runs, so a slow disk, loader or node shows there and only there. The forward is timed too, from the
batch's start to its backward; where the forward holds a collective (DDP's broadcast of BatchNorm buffers, FSDP's
parameter gathers) the ranks that reached it first include their wait for the others in it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class RankTimes(Callback):
    """Logs ``ranks/data_ms_{min,median,max}``, ``ranks/data_slowest_rank`` and ``ranks/forward_ms_{min,median,max}``
    at the Trainer's logging cadence (``log_every_n_steps``): each rank's mean per batch over the interval,
    gathered from every rank. Host clock (on a GPU the forward is then the time to queue it, unless something in
    it waits for the device). Does nothing in a single-process run."""

    def __init__(self) -> None:
        self._batch_end: float | None = None  # when the previous batch ended (None: after validation, or not yet)
        self._batch_start = 0.0
        self._data = 0.0
        self._forward = 0.0
        self._batches = 0
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1:  # one process: not even called per batch (as training.perf.skip_noop_batch_hooks)
            for hook in ("on_train_batch_start", "on_before_backward", "on_train_batch_end"):
                setattr(self, hook, None)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = time.perf_counter()
        if self._batch_end is not None:
            self._data += self._batch_start - self._batch_end

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._batch_end is not None:
            self._forward += time.perf_counter() - self._batch_start
            self._batches += 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if step != self._last_step and every and not step % every and self._batches:
            self._last_step = step
            self._log(trainer, step)
        self._batch_end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch_end = None  # validation is not the wait for the next training batch

    def _log(self, trainer: L.Trainer, step: int) -> None:
        mine = torch.tensor([self._data, self._forward], device=trainer.strategy.root_device) * 1e3 / self._batches
        self._data, self._forward, self._batches = 0.0, 0.0, 0
        data, forward = trainer.strategy.all_gather(mine).reshape(-1, 2).T.tolist()
        metrics = {
            "ranks/data_ms_min": min(data),
            "ranks/data_ms_median": statistics.median(data),
            "ranks/data_ms_max": max(data),
            "ranks/data_slowest_rank": float(max(range(len(data)), key=data.__getitem__)),
            "ranks/forward_ms_min": min(forward),
            "ranks/forward_ms_median": statistics.median(forward),
            "ranks/forward_ms_max": max(forward),
        }
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)  # the index of the step just done, as Lightning logs
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
