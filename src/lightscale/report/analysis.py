"""What the logged metrics say: which columns are losses, rates and learning rates, the best validation,
and whether a run over-fitted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightscale.core import fmt
from lightscale.report.data import RunData, Series

TRAIN_LOSS_KEYS = ("train/loss_step", "train/loss")
TRAIN_EPOCH_LOSS_KEYS = ("train/loss_epoch",)
VAL_LOSS_KEYS = ("val/loss", "val/loss_epoch")
TEST_LOSS_KEYS = ("test/loss", "test/loss_epoch")
_BOOKKEEPING = {"epoch", "step", "trainer/global_step"}
_LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "mse", "mae", "rmse", "nll", "bpb", "bpc")


# ---------------------------------------------------------------------------------------------- metric roles
def first_of(metrics: dict[str, Series], keys: Sequence[str]) -> tuple[str, Series] | None:
    for key in keys:
        if key in metrics and len(metrics[key]):
            return key, metrics[key]
    return None


def lr_keys(metrics: dict[str, Series]) -> list[str]:
    """Learning-rate columns: LearningRateMonitor's ``lr-<Optimizer>[/pgN]`` or a model's ``.../lr``."""
    return sorted(k for k in metrics if k.startswith("lr-") or k in ("lr", "train/lr") or k.endswith("/lr"))


def speed_keys(metrics: dict[str, Series]) -> list[str]:
    """Throughput (totals over devices, not the per-device duplicates), epoch time and GPU memory columns."""
    keys = [
        k
        for k in metrics
        if k.startswith(("throughput/", "time/", "memory/")) and "/device/" not in k and not k.endswith("flops_per_sec")
    ]  # FLOP/s is tokens/s times a constant: MFU says more
    order = ("throughput/samples", "throughput/tokens", "throughput/", "time/", "memory/")
    return sorted(keys, key=lambda k: (next(i for i, p in enumerate(order) if k.startswith(p)), k))


def _metric_base(key: str) -> tuple[str, str] | None:
    """``"val/acc"`` -> ``("val", "acc")``; None for losses, LRs, speed and bookkeeping columns."""
    if key in _BOOKKEEPING or key.startswith(("lr-", "throughput/", "time/", "memory/")) or key.endswith("/lr"):
        return None
    stage, _, base = key.partition("/")
    if not base:
        stage, base = "", key
    for suffix in ("_step", "_epoch"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if base == "loss" or base == "lr":
        return None
    return stage, base


def metric_groups(metrics: dict[str, Series]) -> dict[str, list[str]]:
    """Non-loss metrics grouped by name across stages: ``{"acc": ["train/acc", "val/acc", "test/acc"]}``.

    A metric logged both per step and per epoch contributes only its per-epoch column."""
    groups: dict[str, list[str]] = {}
    for key in sorted(metrics):
        parsed = _metric_base(key)
        if parsed is None or (key.endswith("_step") and key[: -len("_step")] + "_epoch" in metrics):
            continue
        groups.setdefault(parsed[1], []).append(key)
    stage_order = {"train": 0, "val": 1, "test": 2}
    return {
        base: sorted(keys, key=lambda k: (stage_order.get(k.partition("/")[0], 3), k))
        for base, keys in sorted(groups.items())
    }


def lower_is_better(key: str) -> bool:
    name = key.rsplit("/", 1)[-1].lower()
    return any(word in name for word in _LOWER_IS_BETTER)


# --------------------------------------------------------------------------------------------------- analysis
@dataclass
class Best:
    """The best validation of a run by its monitored metric."""

    key: str
    value: float
    step: int
    epoch: int | None
    index: int


def best_validation(run: RunData) -> Best | None:
    """The validation whose monitored value (``summary.json``'s checkpoint monitor, else ``val/loss``) was best."""
    best_info = run.summary.get("best") or {}
    monitor = best_info.get("monitor") or (run.config.get("checkpoint") or {}).get("monitor") or "val/loss"
    series = run.metrics.get(monitor)
    if series is None or not len(series):
        found = first_of(run.metrics, VAL_LOSS_KEYS)
        if found is None:
            return None
        monitor, series = found
    mode = (run.config.get("checkpoint") or {}).get("mode") or ("min" if lower_is_better(monitor) else "max")
    finite = [(i, v) for i, v in enumerate(series.values) if math.isfinite(v)]
    if not finite:
        return None
    pick = min if mode == "min" else max
    index, value = pick(finite, key=lambda item: item[1])  # first of equals, like ModelCheckpoint
    return Best(monitor, value, series.steps[index], series.epochs[index], index)


def value_at(series: Series | None, step: int) -> float | None:
    """The value logged at ``step`` (the last one there), else None."""
    if series is None:
        return None
    found = [v for s, v in zip(series.steps, series.values, strict=True) if s == step]
    return found[-1] if found else None


def train_loss_near(run: RunData, step: int) -> float | None:
    """Train loss at ``step``: the epoch mean ending there, else the last per-step value at or before it."""
    epoch_loss = first_of(run.metrics, TRAIN_EPOCH_LOSS_KEYS)
    if epoch_loss is not None and (value := value_at(epoch_loss[1], step)) is not None:
        return value
    found = first_of(run.metrics, TRAIN_LOSS_KEYS)
    if found is None:
        return None
    before = [v for s, v in zip(found[1].steps, found[1].values, strict=True) if s <= step]
    return before[-1] if before else None


def last_value(series: Series | None) -> float | None:
    return series.values[-1] if series is not None and len(series) else None


def overfitting_verdict(run: RunData, rise_threshold: float = 0.05) -> str:
    """One sentence on the train/val loss picture: still improving, plateau, or over-fitting (and where)."""
    val = first_of(run.metrics, VAL_LOSS_KEYS)
    if val is None:
        return "No validation loss was logged, so over-fitting cannot be judged."
    key, series = val
    if len(series) < 2:
        return f"Only one validation ({key} {fmt.value(series.values[0])}): no trend to read yet."
    finite = [(i, v) for i, v in enumerate(series.values) if math.isfinite(v)]
    if not finite:
        return f"{key} was never finite: the run diverged."
    index, best = min(finite, key=lambda item: item[1])
    final = series.values[-1]
    where = step_and_epoch(series.steps[index], series.epochs[index])
    if index == len(series) - 1:
        return (
            f"{key} was still falling at the last validation ({fmt.value(final)} at {where}): "
            "the model is not over-fitting yet; training longer may help."
        )
    rise = (final - best) / abs(best) if best else math.inf
    train_then = train_loss_near(run, series.steps[index])
    train_end = train_loss_near(run, series.steps[-1])
    train_falls = train_then is not None and train_end is not None and train_end < train_then
    if not math.isfinite(final):
        return f"{key} was lowest at {where} ({fmt.value(best)}) and then became {final}: the run diverged."
    if rise > rise_threshold and train_falls:
        return (
            f"**Over-fitting**: {key} was lowest at {where} ({fmt.value(best)}) and ended {rise:.0%} higher "
            f"({fmt.value(final)}) while the train loss kept falling "
            f"({fmt.value(train_then)} → {fmt.value(train_end)}). "
            f"Keep the best checkpoint; regularise or stop earlier."
        )
    if rise > rise_threshold:
        return f"{key} was lowest at {where} ({fmt.value(best)}) and ended {rise:.0%} higher ({fmt.value(final)})."
    return f"{key} plateaued: lowest at {where} ({fmt.value(best)}), final {fmt.value(final)}."


def step_and_epoch(step: int, epoch: int | None) -> str:
    return f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"
