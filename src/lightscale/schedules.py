"""Learning-rate schedules planned over the run's length.

The example models call their configured scheduler as ``scheduler(optimizer, total_steps=<optimizer steps of the
run>)`` when it takes a ``total_steps`` argument (these do, and so does ``torch.optim.lr_scheduler.OneCycleLR``),
else as ``scheduler(optimizer)`` (any other ``torch.optim.lr_scheduler`` class), and step it after every optimizer
step. So a schedule's length is never written by hand in a config: it follows ``trainer.max_epochs`` /
``max_steps``.
"""

import inspect
import math
from collections.abc import Callable
from typing import Any

from jsonargparse.typing import ClosedUnitInterval, NonNegativeInt, PositiveFloat, PositiveInt
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


class WarmupCosine(LambdaLR):
    """Linear warm-up to each group's lr over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x lr at
    ``total_steps`` (flat after): nanoGPT's schedule. Resumed with a longer run, it re-plans over the new length."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: PositiveInt | None = None,
        warmup_steps: NonNegativeInt = 0,
        min_lr_ratio: ClosedUnitInterval = 0.0,
    ) -> None:
        if total_steps is None:
            raise ValueError("WarmupCosine needs total_steps (the model passes the run's optimizer steps)")
        super().__init__(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps`` (flat after)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class OneCycle(OneCycleLR):
    """``OneCycleLR`` peaking at each parameter group's configured lr (no separate ``max_lr`` to keep in step with
    the model's ``lr``): warm-up for ``pct_start`` of the run, then annealing to lr / (div_factor x
    final_div_factor)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: PositiveInt | None = None,
        pct_start: ClosedUnitInterval = 0.3,
        div_factor: PositiveFloat = 25.0,
        final_div_factor: PositiveFloat = 1e4,
    ) -> None:
        if total_steps is None:
            raise ValueError("OneCycle needs total_steps (the model passes the run's optimizer steps)")
        peaks = [group["lr"] for group in optimizer.param_groups]
        super().__init__(
            optimizer,
            max_lr=peaks,
            total_steps=max(total_steps, 2),
            pct_start=pct_start,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
        )


def plans_over_the_run(scheduler: Callable[..., Any]) -> bool:
    """Whether ``scheduler`` takes a ``total_steps`` the config left unset (``None``): the model fills it in.
    (jsonargparse hands a configured class over as a ``functools.partial`` holding every init argument.)"""
    keywords = getattr(scheduler, "keywords", None)
    if isinstance(keywords, dict) and "total_steps" in keywords:
        return keywords["total_steps"] is None
    try:
        parameter = inspect.signature(scheduler).parameters.get("total_steps")
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return parameter is not None and parameter.default in (None, inspect.Parameter.empty)


def build_scheduler(scheduler: Callable[..., Any], optimizer: Optimizer, total_steps: float) -> LRScheduler:
    """``scheduler(optimizer, total_steps=...)`` when it plans over the run (see module docstring), else
    ``scheduler(optimizer)``. ``total_steps`` is ``trainer.estimated_stepping_batches``: infinite when the data
    has no length and no ``trainer.max_steps`` bounds the run, which a planned schedule cannot use."""
    if not plans_over_the_run(scheduler):
        return scheduler(optimizer)
    if not math.isfinite(total_steps):
        raise ValueError("set trainer.max_steps: the LR schedule is planned over the run's length, which is unknown")
    return scheduler(optimizer, total_steps=int(total_steps))
