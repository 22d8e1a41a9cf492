"""Report a dataset that yields the wrong dtypes or shapes in one line, instead of a traceback from deep in torch.

A user's DataModule that yields float64 images, float labels, or images of another size fails inside the
model's first ``training_step`` / ``validation_step`` with e.g. ``mat1 and mat2 must have the same dtype``
under twenty frames of Lightning. Lightning has no hook around a step, so this callback wraps each step
method of the LightningModule for its *first* call only: a failure there becomes a :class:`BatchError`
naming the step, the error and the structure of the batch (dtypes and shapes); after one successful call the
wrapper removes itself, so later steps cost nothing extra.
"""

import functools
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightscale.core.errors import UserError

STEPS = ("training_step", "validation_step", "test_step", "predict_step")
_DATA_ERRORS = (RuntimeError, TypeError, ValueError, IndexError)


class BatchError(UserError):
    """The model could not process the first batch its data produced."""


def describe(batch: Any, limit: int = 160) -> str:
    """A short structural description of a batch: ``(float64[64, 1, 8, 8], float32[64])``."""

    def walk(item: Any) -> str:
        if isinstance(item, torch.Tensor):
            return f"{str(item.dtype).removeprefix('torch.')}[{', '.join(map(str, item.shape))}]"
        if isinstance(item, (list, tuple)):
            inner = ", ".join(walk(x) for x in item[:4]) + (", ..." if len(item) > 4 else "")
            return f"({inner})" if isinstance(item, tuple) else f"[{inner}]"
        if isinstance(item, dict):
            return "{" + ", ".join(f"{k}: {walk(v)}" for k, v in list(item.items())[:6]) + "}"
        return type(item).__name__

    text = walk(batch)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FirstBatchCheck(L.Callback):
    """Turns a failure of the first call of each step method into a one-line :class:`BatchError` (see module)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in STEPS:
            if name not in vars(pl_module) and is_overridden(name, pl_module, L.LightningModule):
                vars(pl_module)[name] = self._first_call(pl_module, name, getattr(pl_module, name))

    @staticmethod
    def _first_call(pl_module: L.LightningModule, name: str, method: Callable) -> Callable:
        @functools.wraps(method)
        def step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                result = method(batch, *args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except _DATA_ERRORS as error:
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise BatchError(
                    f"{type(pl_module).__name__}.{name} failed on the first batch: {reason}. The batch holds "
                    f"{describe(batch)}: check that the dataset yields the dtypes and shapes the model expects "
                    "(LIGHTSCALE_TRACEBACK=1 shows where it failed)"
                ) from error
            vars(pl_module).pop(name, None)  # succeeded once: later calls go straight to the method
            return result

        return step
