"""The charts of a report and of a comparison, as plain data (:class:`~lightscale.report.plots.Chart`): exactly
the logged values, which tests check; :mod:`lightscale.report.plots` draws them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightscale.core import fmt
from lightscale.report.analysis import (
    TEST_LOSS_KEYS,
    TRAIN_EPOCH_LOSS_KEYS,
    TRAIN_LOSS_KEYS,
    VAL_LOSS_KEYS,
    first_of,
    lr_keys,
    metric_groups,
    speed_keys,
    step_and_epoch,
)
from lightscale.report.data import RunData
from lightscale.report.plots import Chart, Curve, Mark, Panel

_SMOOTH_ABOVE = 60  # train-loss points above which a smoothed copy is drawn over the faint raw curve


# ----------------------------------------------------------------------------------------------------- charts
def _ema(values: Sequence[float], span: int) -> list[float]:
    alpha = 2.0 / (span + 1)
    out: list[float] = []
    for value in values:
        out.append(value if not out or not math.isfinite(out[-1]) else alpha * value + (1 - alpha) * out[-1])
    return out


def _wants_log(values: Sequence[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 30


def loss_panel(run: RunData) -> Panel:
    """Train and validation loss on one chart, x = step: where validation turns up while train keeps falling."""
    panel = Panel(title="Loss: train vs validation", ylabel="loss")
    train = first_of(run.metrics, TRAIN_LOSS_KEYS)
    if train is not None:
        key, series = train
        smooth = len(series) > _SMOOTH_ABOVE
        style: Any = "faint" if smooth else "line"
        panel.curves.append(Curve("train loss (per step)", list(series.steps), list(series.values), style, key=key))
        if smooth:
            span = max(5, len(series) // 30)
            panel.curves.append(Curve(f"train loss (EMA {span})", list(series.steps), _ema(series.values, span)))
    for keys, label, style in (
        (TRAIN_EPOCH_LOSS_KEYS, "train loss (epoch mean)", "dashed"),
        (VAL_LOSS_KEYS, "validation loss", "markers"),
        (TEST_LOSS_KEYS, "test loss (best checkpoint)", "points"),
    ):
        found = first_of(run.metrics, keys)
        if found is not None:
            key, series = found
            if keys == TRAIN_EPOCH_LOSS_KEYS and train is not None and len(train[1]) < 1.5 * len(series):
                continue  # about one logged step per epoch: the epoch mean would hide under the per-step curve
            panel.curves.append(Curve(label, list(series.steps), list(series.values), style, key=key))
    colors = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}
    for curve in panel.curves:
        curve.color = next((c for prefix, c in colors.items() if curve.label.startswith(prefix)), None)
    val = first_of(run.metrics, VAL_LOSS_KEYS)
    if val is not None:
        key, series = val
        finite = [(i, v) for i, v in enumerate(series.values) if math.isfinite(v)]
        if finite:
            index, best = min(finite, key=lambda item: item[1])
            step = series.steps[index]
            panel.marks.append(
                Mark(step, best, f"lowest {key} {fmt.value(best)}\n{step_and_epoch(step, series.epochs[index])}")
            )
            if index < len(series) - 1 and series.values[-1] > best * 1.05:
                panel.shade = (step, series.steps[-1], "over-fitting: validation loss rising")
    panel.log_y = _wants_log([v for c in panel.curves for v in c.y])
    return panel


def run_charts(run: RunData) -> list[Chart]:
    """The charts of one run's report (only those with data): loss, metrics, lr, speed."""
    charts: list[Chart] = []
    loss = loss_panel(run)
    if loss.curves:
        charts.append(Chart("loss", f"{run.name}: loss", [loss]))
    panels = []
    for base, keys in metric_groups(run.metrics).items():
        curves = []
        for key in keys:
            series = run.metrics[key]
            stage = key.partition("/")[0]
            style = "points" if stage == "test" else ("markers" if stage == "val" else "line")
            curves.append(Curve(key, list(series.steps), list(series.values), style, key=key))
        panels.append(Panel(title=base, ylabel=base, curves=curves))
    if panels:
        charts.append(Chart("metrics", f"{run.name}: metrics", panels))
    keys = lr_keys(run.metrics)
    if keys:
        curves = [Curve(k, list(run.metrics[k].steps), list(run.metrics[k].values), key=k) for k in keys]
        charts.append(
            Chart("lr", f"{run.name}: learning rate", [Panel("Learning-rate schedule", "learning rate", curves)])
        )
    panels = []
    for key in speed_keys(run.metrics):
        series = run.metrics[key]
        style = "markers" if key.startswith(("time/", "memory/")) else "line"
        curve = Curve(key, list(series.steps), list(series.values), style, key=key)
        panels.append(Panel(key, _speed_unit(key), [curve], y_from_zero=True))
    if panels:
        charts.append(Chart("throughput", f"{run.name}: speed and memory", panels))
    return charts


def _speed_unit(key: str) -> str:
    if key.startswith("memory/"):
        return "GB"
    if key.startswith("time/"):
        return "seconds"
    if key.endswith("mfu"):
        return "fraction of peak FLOP/s"
    return key.rsplit("/", 1)[-1].replace("_per_sec", "/s").replace("_", " ")


def _run_color(index: int) -> str:
    return f"C{index % 10}"


def comparison_charts(runs: Sequence[RunData]) -> list[Chart]:
    """Overlays across runs (one color per run): losses, validation metrics, LR, throughput."""
    charts: list[Chart] = []
    val_panel = Panel("Validation loss", "loss")
    train_panel = Panel("Train loss (per step)", "loss")
    for index, run in enumerate(runs):
        color = _run_color(index)
        if (found := first_of(run.metrics, VAL_LOSS_KEYS)) is not None:
            val_panel.curves.append(
                Curve(run.label, list(found[1].steps), list(found[1].values), "markers", color, found[0])
            )
        if (found := first_of(run.metrics, TRAIN_LOSS_KEYS)) is not None:
            train_panel.curves.append(
                Curve(run.label, list(found[1].steps), list(found[1].values), "line", color, found[0])
            )
    for panel in (val_panel, train_panel):
        panel.log_y = _wants_log([v for c in panel.curves for v in c.y])
    loss_panels = [p for p in (val_panel, train_panel) if p.curves]
    if loss_panels:
        charts.append(Chart("compare_loss", "Loss across runs", loss_panels))
    metric_keys = sorted(
        {k for run in runs for ks in metric_groups(run.metrics).values() for k in ks if k.startswith("val/")}
    )
    panels = [_overlay(runs, key, "markers") for key in metric_keys]
    if panels:
        charts.append(Chart("compare_metrics", "Validation metrics across runs", panels))
    lr = sorted({k for run in runs for k in lr_keys(run.metrics)})
    if lr:
        charts.append(Chart("compare_lr", "Learning rate across runs", [_overlay(runs, k, "line") for k in lr]))
    speed = [k for k in dict.fromkeys(k for run in runs for k in speed_keys(run.metrics))]
    if speed:
        charts.append(Chart("compare_throughput", "Speed across runs", [_overlay(runs, k, "markers") for k in speed]))
    return charts


def _overlay(runs: Sequence[RunData], key: str, style: str) -> Panel:
    speed = key.startswith(("throughput/", "time/", "memory/"))
    panel = Panel(key, _speed_unit(key) if speed else key, y_from_zero=speed)
    for index, run in enumerate(runs):
        series = run.metrics.get(key)
        if series is not None and len(series):
            curve = Curve(run.label, list(series.steps), list(series.values), style, _run_color(index), key)  # type: ignore[arg-type]
            panel.curves.append(curve)
    return panel
