"""Training throughput (samples/s, tokens/s) and model FLOPs utilisation, per device and in total.

Lightning's own ``ThroughputMonitor`` synchronises the GPU after every batch to time it; this callback only
synchronises at the Trainer's logging cadence (``log_every_n_steps``) and times whole logging intervals,
which measures the same rates without stalling the CPU-GPU pipeline on every step. It reuses Lightning's
``Throughput`` bookkeeping and its table of peak device FLOPs.
"""

import time
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.utilities import rank_zero_info

from lightscale.contract import check_counts_tokens

# Dense (no 2:4 sparsity) peaks where Lightning's table lists the sparse figure. NVIDIA datasheets.
_DENSE_PEAKS: dict[str, dict[Any, float]] = {
    "h200 nvl": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tfloat32": 417.5e12, torch.float32: 60e12},
    "h200": {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, "tfloat32": 494.7e12, torch.float32: 67e12},
}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under a Trainer ``precision`` setting."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Theoretical dense peak FLOP/s of ``device`` in ``dtype``, or ``None`` when unknown (CPUs: MFU is
    then not reported rather than computed against an invented peak)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for chip, peaks in _DENSE_PEAKS.items():
            if chip in name:
                if dtype is torch.float32 and torch.get_float32_matmul_precision() != "highest":
                    dtype = "tfloat32"
                return peaks.get(dtype)
    flops = get_available_flops(device, dtype)
    return float(flops) if flops else None


class ThroughputLogger(L.Callback):
    """Logs ``throughput/{samples,tokens,flops}_per_sec`` (all devices), ``throughput/device/...`` (one
    device) and ``throughput/mfu`` during training, and leaves whole-run averages in
    ``trainer.callback_metrics`` (same keys) and :attr:`summary` when training ends.

    Tokens and FLOPs come from the LightningModule when it offers ``tokens_in_batch(batch)`` and
    ``flops_per_token(seq_len)`` (:class:`~lightscale.models.causal_lm.CausalLM` does), else a
    ``flops_per_batch`` attribute (Lightning's convention), looked up when training starts; samples are the
    batch's leading dimension.
    Time spent in validation is excluded. Figures assume identical devices (total = device x world size).

    Args:
        window: number of logging intervals the rolling rates average over (2: the latest interval).
        peak_flops: peak FLOP/s of one device, overriding the lookup (e.g. for a GPU missing from the table).
    """

    def __init__(self, window: PositiveInt = 2, peak_flops: PositiveFloat | None = None) -> None:
        super().__init__()
        if window < 2:
            raise ValueError("window must be >= 2 (rates are differences between logging points)")
        self.window = window
        self.peak_flops = peak_flops
        self.summary: dict[str, float] = {}
        self._tokens_in_batch: Any = None
        self._flops_per_token: Any = None
        self._flops_per_batch: float | None = None
        self._reset(step=0)

    def _reset(self, step: int) -> None:
        self._batches = self._samples = self._tokens = 0
        self._flops = self._last_flops = 0.0
        self._last_step = step
        self._start: tuple[float, int, int, float] | None = None  # time, samples, tokens, flops at 1st point
        self._paused = 0.0
        self._val_start: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        self.available_flops = self.peak_flops or device_peak_flops(device, compute_dtype(str(trainer.precision)))
        self.world_size = trainer.world_size
        self._tracker = Throughput(self.available_flops, self.world_size, window_size=self.window)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tracker.reset()
        self._reset(step=trainer.global_step)
        self.summary = {}
        # looked up once, not per batch: a missing attribute of an nn.Module costs ~10 us to find missing
        counts = check_counts_tokens(pl_module)
        flops_per_batch = getattr(pl_module, "flops_per_batch", None)
        self._tokens_in_batch = pl_module.tokens_in_batch if counts else None
        self._flops_per_token = pl_module.flops_per_token if counts else None
        self._flops_per_batch = flops_per_batch if isinstance(flops_per_batch, (int, float)) else None

    def _count(self, batch: Any) -> None:
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        samples = int(first.shape[0]) if hasattr(first, "shape") else 1
        tokens = int(self._tokens_in_batch(batch)) if self._tokens_in_batch is not None else 0
        if self._flops_per_token is not None and tokens:
            seq_len = first.shape[1] - 1 if first.ndim == 2 else None
            self._flops += tokens * self._flops_per_token(seq_len)
        elif self._flops_per_batch is not None:
            self._flops += self._flops_per_batch
        self._batches += 1
        self._samples += samples
        self._tokens += tokens

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # only at logging points: the clock must see the queued work finish
        return time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._count(batch)
        step, every = trainer.global_step, trainer.log_every_n_steps
        if step == self._last_step or not every or step % every:  # accumulating, or not a logging step
            return
        self._last_step = step
        metrics = self._record(self._now(trainer))
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)  # the index of the step just done, as Lightning logs
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def _record(self, now: float) -> dict[str, float]:
        if self._start is None:
            self._start = (now, self._samples, self._tokens, self._flops)
        elapsed = now - self._start[0] - self._paused
        if self._tracker._time and elapsed <= self._tracker._time[-1]:
            return {}
        self._tracker.update(
            time=elapsed,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens if self._tokens >= self._samples else None,
            flops=self._flops - self._last_flops if self._flops else None,
        )
        self._last_flops = self._flops
        return self._rename(self._tracker.compute())

    def _rename(self, raw: dict[str, float]) -> dict[str, float]:
        out = {}
        for key, name in (("samples_per_sec", "samples_per_sec"), ("items_per_sec", "tokens_per_sec")):
            if f"device/{key}" in raw:
                out[f"throughput/device/{name}"] = raw[f"device/{key}"]
                out[f"throughput/{name}"] = raw.get(key, raw[f"device/{key}"] * self.world_size)
        if "device/flops_per_sec" in raw:
            out["throughput/device/flops_per_sec"] = raw["device/flops_per_sec"]
            out["throughput/flops_per_sec"] = raw["device/flops_per_sec"] * self.world_size
        if "device/mfu" in raw:
            out["throughput/mfu"] = raw["device/mfu"]
        return out

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self._start is not None:  # during fit, after the 1st point
            self._val_start = self._now(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None:
            self._paused += self._now(trainer) - self._val_start
            self._val_start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Whole-run averages, from the first logging point (after compilation and warm-up) to the end."""
        if self._start is None:
            return
        t0, samples0, tokens0, flops0 = self._start
        elapsed = self._now(trainer) - t0 - self._paused
        if elapsed <= 0 or self._samples == samples0:
            return
        per_device = {
            "samples_per_sec": (self._samples - samples0) / elapsed,
            "tokens_per_sec": (self._tokens - tokens0) / elapsed,
            "flops_per_sec": (self._flops - flops0) / elapsed,
        }
        summary = {}
        for name, value in per_device.items():
            if value:
                summary[f"throughput/device/{name}"] = value
                summary[f"throughput/{name}"] = value * self.world_size
        if self.available_flops and per_device["flops_per_sec"]:
            summary["throughput/mfu"] = per_device["flops_per_sec"] / self.available_flops
        self.summary = summary
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in summary.items()})
        parts = [f"{summary.get('throughput/tokens_per_sec', 0):,.0f} tokens/s"] if self._tokens else []
        parts.append(f"{summary['throughput/samples_per_sec']:,.1f} samples/s")
        if "throughput/mfu" in summary:
            parts.append(f"MFU {summary['throughput/mfu']:.1%}")
        rank_zero_info(f"Throughput over the run ({self.world_size} device(s), total): " + ", ".join(parts))
