"""Peak memory of every rank, and an out-of-memory error that says which rank, at which step, how much was asked
for and how much was free, with the allocator's history to look at when it was recorded.

On CUDA, "peak" is what PyTorch's allocator held (allocated and reserved); on the CPU it is the process's peak
resident set size, which includes everything the process ever held (Python, data, the allocator's cache).
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import Callback

from lightscale.core.hardware import node_name
from lightscale.core.run_dir import DIAGNOSTICS_DIR, update_summary

GB = 1e9
VIEWER = "https://pytorch.org/memory_viz"


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory on ``device`` in 10^9 bytes: CUDA allocated/reserved, or the CPU's peak RSS."""
    if device.type == "cuda":
        return {
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB,
        }
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_rss_gb": kib_or_bytes * (1 if sys.platform == "darwin" else 1024) / GB}


def describe_oom(message: str) -> str:
    """``requested 2.00 GiB, 1.20 GiB free of 79.15 GiB`` from PyTorch's out-of-memory message (as much as it says)."""
    requested = re.search(r"Tried to allocate ([\d.]+ ?[KMGT]i?B)", message)
    free = re.search(r"of which ([\d.]+ ?[KMGT]i?B) is free", message)
    total = re.search(r"total capacity of ([\d.]+ ?[KMGT]i?B)", message)
    parts = []
    if requested:
        parts.append(f"requested {requested.group(1)}")
    if free:
        parts.append(f"{free.group(1)} free" + (f" of {total.group(1)}" if total else ""))
    if parts:
        return ", ".join(parts)
    return message.strip().splitlines()[0][:200] if message.strip() else "no details"


def _gather(trainer: L.Trainer, value: dict[str, float]) -> list[dict[str, float]]:
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


class MemoryWatch(Callback):
    """Logs the peak memory at every validation (``memory/peak_*_gb``: the largest over the ranks) and keeps every
    rank's peaks in ``summary.json`` (``memory``); turns an out-of-memory error into one line with the rank, its
    host, the global step, what was requested and what was free.

    Args:
        record_history: on CUDA, record the allocator's history (``torch.cuda.memory._record_memory_history``), so
            an out-of-memory error leaves ``<run_dir>/diagnostics/memory-rank<R>.pickle`` to open in the viewer at
            https://pytorch.org/memory_viz. It costs a little on every allocation: switch it on to find a leak or an
            out-of-memory, not for every run.
        snapshot_at_step: with ``record_history``, also write a snapshot after this global step.
    """

    def __init__(self, record_history: bool = False, snapshot_at_step: PositiveInt | None = None) -> None:
        self.record_history = record_history
        self.snapshot_at_step = snapshot_at_step
        self._recording = False

    def _snapshot(self, trainer: L.Trainer, name: str) -> Path | None:
        if not self._recording:
            return None
        path = Path(trainer.default_root_dir) / DIAGNOSTICS_DIR / f"{name}-rank{trainer.global_rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.record_history and trainer.strategy.root_device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
            self._recording = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.snapshot_at_step is not None and trainer.global_step == self.snapshot_at_step:
            self._snapshot(trainer, f"memory-step{trainer.global_step}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        ranks = _gather(trainer, peak_memory(trainer.strategy.root_device))
        peaks = {f"memory/{key}": max(rank[key] for rank in ranks) for key in ranks[0]}
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in peaks.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(peaks, step=max(trainer.global_step - 1, 0))
            by_rank = {f"rank{r}": {k: round(v, 3) for k, v in rank.items()} for r, rank in enumerate(ranks)}
            update_summary(Path(trainer.default_root_dir), {"memory": by_rank})

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.OutOfMemoryError):
            return
        snapshot = None
        try:
            snapshot = self._snapshot(trainer, "memory-oom")
        except Exception:  # a failing dump must not hide the out-of-memory error
            snapshot = None
        where = f"rank {trainer.global_rank} ({node_name()}) at global step {trainer.global_step}"
        message = f"out of memory on {where}: {describe_oom(str(exception))}"
        if snapshot is not None:
            message += f"; allocator history in {snapshot} (open it at {VIEWER})"
        elif trainer.strategy.root_device.type == "cuda":
            message += "; --memory.record_history true keeps the allocator's history for next time"
        exception.lightscale_message = message  # type: ignore[attr-defined]  # main prints it as the one line
