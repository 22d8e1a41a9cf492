"""Process-wide speed settings the template applies when it builds the Trainer (figures: benchmarks/)."""

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.profilers import PassThroughProfiler

_NULL_CONTEXT = contextlib.nullcontext()

#: Callback hooks the Trainer calls for every batch or optimizer step.
PER_BATCH_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_predict_batch_start",
    "on_predict_batch_end",
)


class NullProfiler(PassThroughProfiler):
    """Lightning's default "no profiler", minus its cost: ``profile()`` returns one shared no-op context
    instead of creating a generator-based context manager on every call.

    The Trainer opens ~140 profiling contexts per training step (one per hook and callback); with
    ``PassThroughProfiler`` that was ~0.4 ms per step on a 2-core CPU, ~1% of the digits step. Choosing a
    profiler (``--trainer.profiler simple``) replaces this one as usual.
    """

    def profile(self, action_name: str) -> contextlib.AbstractContextManager:
        return _NULL_CONTEXT


def enable_tf32() -> bool:
    """Let float32 matmuls use TF32 tensor cores on Ampere or newer GPUs (``float32_matmul_precision`` "high").

    fp32 matmuls then run up to ~8x faster on the tensor cores, with a 10-bit mantissa in the multiply and fp32
    accumulation, which training tolerates (it is PyTorch's own recommendation, and Lightning warns when it is
    off). It matters for ``precision=32`` runs and for the fp32 parts of mixed-precision runs. Left alone when
    there is no such GPU, or when the user already chose a precision other than the default "highest".
    Returns whether it was switched on.
    """
    if not torch.cuda.is_available() or torch.get_float32_matmul_precision() != "highest":
        return False
    if torch.cuda.get_device_capability()[0] < 8:
        return False
    torch.set_float32_matmul_precision("high")
    return True


def speed_settings(trainer_config: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer keyword arguments for speed that the user's config did not set (and TF32, see
    :func:`enable_tf32`). ``trainer_config`` is the instantiated trainer config."""
    enable_tf32()
    return {} if trainer_config.get("profiler") is not None else {"profiler": NullProfiler()}


def skip_noop_batch_hooks(trainer: Trainer) -> int:
    """Stop the Trainer from calling per-batch hooks that a callback does not implement.

    Lightning calls every hook of every callback, the base class's empty ones included, each inside a
    profiler context and with the callback's state key formatted into a string: ~7 us per call on a 2-core
    CPU, ~90 calls per training step with the template's 15 callbacks (~0.5 ms, 1.5% of the digits step).
    Its dispatcher skips a hook attribute that is not callable, so each per-batch hook a callback inherits
    unchanged from ``Callback`` is set to ``None`` on that callback instance. Returns how many were set.
    """
    skipped = 0
    for callback in trainer.callbacks:
        for name in PER_BATCH_HOOKS:
            if getattr(type(callback), name, None) is getattr(Callback, name) and name not in vars(callback):
                setattr(callback, name, None)
                skipped += 1
    return skipped
