"""Run reports: ``report.md`` and PNG charts that say at a glance how a run went, and run comparisons.

Everything is read from files every run has, even with W&B disabled: ``metrics.csv`` (the CSV logger),
``config.yaml``, ``summary.json``, ``provenance.json`` and ``tuning.json`` in the run directory. The CLI writes a
report at the end of every run; ``lightscale report RUN_DIR`` (re)writes one, and
``lightscale report RUN_DIR RUN_DIR ... [--out DIR]`` overlays several runs and tabulates how their results and
configs differ. A folder holding run directories (``runs/digits``) stands for all of them.

Charts are built as plain data (:class:`~lightscale.report_plots.Chart`) by :func:`run_charts` and
:func:`comparison_charts`, then drawn; the data is exactly the logged values, which tests check.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightscale.report_plots import Chart, Curve, Mark, Panel

REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.md"
TRAIN_LOSS_KEYS = ("train/loss_step", "train/loss")
TRAIN_EPOCH_LOSS_KEYS = ("train/loss_epoch",)
VAL_LOSS_KEYS = ("val/loss", "val/loss_epoch")
TEST_LOSS_KEYS = ("test/loss", "test/loss_epoch")
_BOOKKEEPING = {"epoch", "step", "trainer/global_step"}
_LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "mse", "mae", "rmse", "nll", "bpb", "bpc")
_RUN_NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]+")  # run_dir.new_run_dir
_SMOOTH_ABOVE = 60  # train-loss points above which a smoothed copy is drawn over the faint raw curve


# ----------------------------------------------------------------------------------------------------- reading
@dataclass
class Series:
    """One logged metric: the step (and epoch, where the row had one) of every value, in logging order."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    epochs: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class RunData:
    """What a run directory holds, parsed."""

    path: Path
    metrics: dict[str, Series]
    config: dict[str, Any]
    summary: dict[str, Any]
    provenance: dict[str, Any]
    tuning: dict[str, Any]
    label: str = ""

    @property
    def name(self) -> str:
        return str((self.config.get("run") or {}).get("name") or self.path.parent.name)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(path: str | Path) -> dict[str, Series]:
    """``metrics.csv`` as written by Lightning's CSVLogger: one :class:`Series` per column, empty cells skipped."""
    metrics: dict[str, Series] = {}
    path = Path(path)
    if not path.is_file():
        return metrics
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            step_value = _float(row.get("step") or "")
            if step_value is None:
                continue
            epoch_value = _float(row.get("epoch") or "")
            epoch = int(epoch_value) if epoch_value is not None and math.isfinite(epoch_value) else None
            for key, text in row.items():
                if key in ("step", "epoch") or key is None or text in (None, ""):
                    continue
                value = _float(text)
                if value is None:
                    continue
                series = metrics.setdefault(key, Series())
                series.steps.append(int(step_value))
                series.values.append(value)
                series.epochs.append(epoch)
    return metrics


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_run(path: str | Path) -> RunData:
    """Parse a run directory (missing files give empty parts: a report of what there is)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    config: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return RunData(
        path=path,
        metrics=read_metrics_csv(path / "metrics.csv"),
        config=config,
        summary=_read_json(path / "summary.json"),
        provenance=_read_json(path / "provenance.json"),
        tuning=_read_json(path / "tuning.json"),
        label=path.name,
    )


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("metrics.csv", "config.yaml", "summary.json"))


def has_results(path: Path) -> bool:
    """A run that got far enough to report on: a finished (or stopped) summary, or at least one logged metric."""
    summary = _read_json(path / "summary.json")
    if summary.get("status") in ("finished", "terminated", "requeued") or summary.get("global_step"):
        return True
    metrics = path / "metrics.csv"
    try:
        with metrics.open() as file:
            return len(list(itertools.islice(file, 2))) > 1  # a header and one row
    except OSError:
        return False


def newest_run(root: str | Path = "runs") -> Path:
    """The most recently started run under ``root`` that has results (runs still starting, or that failed before
    writing anything, are passed over)."""
    runs = [p.parent for p in Path(root).glob("**/config.yaml") if is_run_dir(p.parent) and has_results(p.parent)]
    runs += [p.parent for p in Path(root).glob("**/metrics.csv") if has_results(p.parent)]
    if not runs:
        raise FileNotFoundError(f"no run with results under {root}/")
    return max(set(runs), key=lambda p: (p / "config.yaml" if (p / "config.yaml").exists() else p).stat().st_mtime)


def expand_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories named by ``paths``; a folder that is not a run but holds runs stands for all of them."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
        if is_run_dir(path):
            found.append(path)
            continue
        runs = sorted(p.parent for p in path.rglob("metrics.csv") if is_run_dir(p.parent))
        runs = runs or sorted(p.parent for p in path.rglob("config.yaml") if is_run_dir(p.parent))
        if not runs:
            raise FileNotFoundError(f"{path} holds no run (no metrics.csv, config.yaml or summary.json)")
        found.extend(runs)
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------------------------------------- metric roles
def _first(metrics: dict[str, Series], keys: Sequence[str]) -> tuple[str, Series] | None:
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
        found = _first(run.metrics, VAL_LOSS_KEYS)
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


def _train_loss_near(run: RunData, step: int) -> float | None:
    """Train loss at ``step``: the epoch mean ending there, else the last per-step value at or before it."""
    epoch_loss = _first(run.metrics, TRAIN_EPOCH_LOSS_KEYS)
    if epoch_loss is not None and (value := value_at(epoch_loss[1], step)) is not None:
        return value
    found = _first(run.metrics, TRAIN_LOSS_KEYS)
    if found is None:
        return None
    before = [v for s, v in zip(found[1].steps, found[1].values, strict=True) if s <= step]
    return before[-1] if before else None


def _last(series: Series | None) -> float | None:
    return series.values[-1] if series is not None and len(series) else None


def overfitting_verdict(run: RunData, rise_threshold: float = 0.05) -> str:
    """One sentence on the train/val loss picture: still improving, plateau, or over-fitting (and where)."""
    val = _first(run.metrics, VAL_LOSS_KEYS)
    if val is None:
        return "No validation loss was logged, so over-fitting cannot be judged."
    key, series = val
    if len(series) < 2:
        return f"Only one validation ({key} {_fmt(series.values[0])}): no trend to read yet."
    finite = [(i, v) for i, v in enumerate(series.values) if math.isfinite(v)]
    if not finite:
        return f"{key} was never finite: the run diverged."
    index, best = min(finite, key=lambda item: item[1])
    final = series.values[-1]
    where = _where(series.steps[index], series.epochs[index])
    if index == len(series) - 1:
        return (
            f"{key} was still falling at the last validation ({_fmt(final)} at {where}): "
            "the model is not over-fitting yet; training longer may help."
        )
    rise = (final - best) / abs(best) if best else math.inf
    train_then = _train_loss_near(run, series.steps[index])
    train_end = _train_loss_near(run, series.steps[-1])
    train_falls = train_then is not None and train_end is not None and train_end < train_then
    if not math.isfinite(final):
        return f"{key} was lowest at {where} ({_fmt(best)}) and then became {final}: the run diverged."
    if rise > rise_threshold and train_falls:
        return (
            f"**Over-fitting**: {key} was lowest at {where} ({_fmt(best)}) and ended {rise:.0%} higher "
            f"({_fmt(final)}) while the train loss kept falling ({_fmt(train_then)} → {_fmt(train_end)}). "
            f"Keep the best checkpoint; regularise or stop earlier."
        )
    if rise > rise_threshold:
        return f"{key} was lowest at {where} ({_fmt(best)}) and ended {rise:.0%} higher ({_fmt(final)})."
    return f"{key} plateaued: lowest at {where} ({_fmt(best)}), final {_fmt(final)}."


def _where(step: int, epoch: int | None) -> str:
    return f"epoch {epoch}, step {step}" if epoch is not None else f"step {step}"


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
    train = _first(run.metrics, TRAIN_LOSS_KEYS)
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
        found = _first(run.metrics, keys)
        if found is not None:
            key, series = found
            if keys == TRAIN_EPOCH_LOSS_KEYS and train is not None and len(train[1]) < 1.5 * len(series):
                continue  # about one logged step per epoch: the epoch mean would hide under the per-step curve
            panel.curves.append(Curve(label, list(series.steps), list(series.values), style, key=key))
    colors = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}
    for curve in panel.curves:
        curve.color = next((c for prefix, c in colors.items() if curve.label.startswith(prefix)), None)
    val = _first(run.metrics, VAL_LOSS_KEYS)
    if val is not None:
        key, series = val
        finite = [(i, v) for i, v in enumerate(series.values) if math.isfinite(v)]
        if finite:
            index, best = min(finite, key=lambda item: item[1])
            step = series.steps[index]
            panel.marks.append(Mark(step, best, f"lowest {key} {_fmt(best)}\n{_where(step, series.epochs[index])}"))
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
        if (found := _first(run.metrics, VAL_LOSS_KEYS)) is not None:
            val_panel.curves.append(
                Curve(run.label, list(found[1].steps), list(found[1].values), "markers", color, found[0])
            )
        if (found := _first(run.metrics, TRAIN_LOSS_KEYS)) is not None:
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


# --------------------------------------------------------------------------------------------------- markdown
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else _fmt(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model.init_args.lr": 0.003, "trainer.callbacks[0].init_args.patience": 8, ...}``.

    Lists of mappings (callbacks, loggers) are indexed; lists of plain values stay whole (``channels``)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(tree, list) and any(isinstance(item, dict) for item in tree):
        out = {}
        for index, item in enumerate(tree):
            out.update(flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: tree}


def _normalised_config(run: RunData) -> dict[str, Any]:
    """Flat config with the run's own directory replaced by ``<run_dir>`` (paths into it always differ)."""
    flat = flatten(run.config)
    root = (run.config.get("trainer") or {}).get("default_root_dir")
    if not root:
        return flat
    roots = sorted({str(root), str(Path(root).resolve())}, key=len, reverse=True)

    def norm(value: Any) -> Any:
        if isinstance(value, str):
            for r in roots:
                value = value.replace(r, "<run_dir>")
        return value

    return {key: norm(value) for key, value in flat.items()}


def config_diff(runs: Sequence[RunData]) -> dict[str, list[Any]]:
    """Config keys whose values differ between the runs -> the value in each run (``None`` where absent)."""
    flats = [_normalised_config(run) for run in runs]
    keys = sorted({key for flat in flats for key in flat})
    missing = object()
    diff: dict[str, list[Any]] = {}
    for key in keys:
        values = [flat.get(key, missing) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            diff[key] = [None if v is missing else v for v in values]
    return diff


_KEY_SETTINGS = (
    "seed_everything",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.precision",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.log_every_n_steps",
)


def _settings_rows(run: RunData) -> list[tuple[str, Any]]:
    flat = flatten(run.config)
    rows: list[tuple[str, Any]] = []
    for section in ("model", "data"):
        if f"{section}.class_path" in flat:
            rows.append((f"{section}.class_path", f"`{flat[f'{section}.class_path']}`"))
        rows += [(k, v) for k, v in flat.items() if k.startswith(f"{section}.init_args.")]
    for key in _KEY_SETTINGS:
        if key in flat and flat[key] is not None:
            rows.append((key, flat[key]))
    strategy = [(k, v) for k, v in flat.items() if k == "trainer.strategy.class_path"]
    return rows + strategy


def _wandb_runs(run_dir: Path) -> list[Path]:
    wandb_dir = run_dir / "wandb"
    if not wandb_dir.is_dir():
        return []
    return sorted(p for p in wandb_dir.iterdir() if p.is_dir() and p.name.startswith(("offline-run-", "run-")))


def _provenance_rows(prov: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    git = prov.get("git")
    if git:
        text = f"`{(git.get('commit') or 'no commit')[:12]}` on `{git.get('branch') or 'detached HEAD'}`"
        if git.get("dirty"):
            text += f", **uncommitted changes** (patch: `{git.get('diff_file', 'git.diff')}`)"
        rows.append(("git", text))
    elif "git" in prov:
        rows.append(("git", "not a git repository"))
    if prov.get("command"):
        rows.append(("command", f"`{prov['command']}`"))
    versions = prov.get("versions") or {}
    names = ("python", "torch", "lightning", "cuda", "wandb")
    rows.append(("versions", ", ".join(f"{n} {versions[n]}" for n in names if versions.get(n))))
    hw = prov.get("hardware") or {}
    if hw:
        gpus = [g.get("name") for g in hw.get("gpus") or []]
        device = f"{hw.get('accelerator', '?')} x {hw.get('devices', '?')} on {hw.get('num_nodes', 1)} node(s)"
        rows.append(("hardware", f"{device}; {', '.join(gpus) if gpus else hw.get('cpu', '')} ({hw.get('hostname')})"))
        rows.append(("precision / strategy", f"{hw.get('precision')} / {hw.get('strategy')}"))
    params = prov.get("parameters") or {}
    if params:
        rows.append(("parameters", f"{_human(params.get('total'))} ({_human(params.get('trainable'))} trainable)"))
    slurm = prov.get("slurm")
    if slurm:
        parts = [f"job {slurm.get('job_id')}"]
        if slurm.get("array_job_id") is not None:
            parts.append(f"array {slurm.get('array_job_id')}_{slurm.get('array_task_id')}")
        parts.append(f"restarts {slurm.get('restart_count', 0)}")
        rows.append(("SLURM", ", ".join(parts)))
    return rows


def _human(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def _results_rows(run: RunData, best: Best | None) -> list[tuple[str, Any, Any]]:
    """``(metric, at best validation, last)`` for validation metrics, then test and train loss."""
    rows: list[tuple[str, Any, Any]] = []
    val_keys = sorted(
        (k for k in run.metrics if k.startswith("val/") and not k.endswith("_step")),
        key=lambda k: (k != (best.key if best else "val/loss"), k),
    )
    for key in val_keys:
        at_best = value_at(run.metrics[key], best.step) if best else None
        rows.append((key, at_best, _last(run.metrics[key])))
    for key in sorted(k for k in run.metrics if k.startswith("test/")):
        rows.append((key, _last(run.metrics[key]), "-"))
    train = _first(run.metrics, TRAIN_EPOCH_LOSS_KEYS + TRAIN_LOSS_KEYS)
    if train is not None:
        rows.append((train[0], _train_loss_near(run, best.step) if best else None, _last(train[1])))
    return rows


def _facts(run: RunData) -> str:
    s = run.summary
    parts = []
    if "global_step" in s:
        parts.append(f"{s['global_step']:,} steps")
    if "epochs" in s:
        parts.append(f"{s['epochs']} epochs")
    if s.get("fit_seconds") is not None:
        parts.append(f"fit {_duration(s['fit_seconds'])}")
    fit = s.get("fit_metrics") or {}
    if isinstance(fit.get("throughput/tokens_per_sec"), (int, float)):
        parts.append(f"{fit['throughput/tokens_per_sec']:,.0f} tokens/s")
    if s.get("train_samples_per_sec"):
        parts.append(f"{s['train_samples_per_sec']:,.0f} samples/s")
    if isinstance(fit.get("throughput/mfu"), (int, float)):
        parts.append(f"MFU {fit['throughput/mfu']:.1%}")
    peak = run.metrics.get("memory/peak_gb")
    if peak is not None and len(peak):
        parts.append(f"peak GPU memory {max(peak.values):.2f} GB")
    if s.get("world_size"):
        parts.append(f"{s['world_size']} process(es)")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _notable_files(run_dir: Path) -> list[str]:
    patterns = (
        "checkpoints/*.ckpt",
        "git*.diff",
        "tuning.json",
        "lr_find.png",
        "*.pt.trace.json",
        "**/*.pt.trace.json",
        "fit-*.txt",
        "*profile*.txt",
    )
    found: dict[str, None] = {}
    for pattern in patterns:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_file():
                found[str(path.relative_to(run_dir))] = None
    return list(found)


def render_report(run: RunData, charts: Sequence[Chart], image_dir: str = "") -> str:
    """The markdown of one run's report (images referenced relative to the report)."""
    best = best_validation(run)
    lines = [f"# Run report: {run.name} / {run.path.name}", ""]
    facts = _facts(run)
    lines += [f"`{run.path}`" + (f" · {facts}" if facts else ""), ""]
    lines += ["## Verdict", "", overfitting_verdict(run), ""]
    if best is not None:
        lines += [f"Best checkpoint by `{best.key}`: {_fmt(best.value)} at {_where(best.step, best.epoch)}.", ""]
    rows = _results_rows(run, best)
    if rows:
        at = f"at best ({_where(best.step, best.epoch)})" if best else "at best"
        lines += ["## Results", "", *_table(["metric", at, "last"], rows), ""]
    titles = {"loss": "Loss", "metrics": "Metrics", "lr": "Learning rate", "throughput": "Speed and memory"}
    for chart in charts:
        lines += [f"## {titles.get(chart.name, chart.title)}", "", f"![{chart.title}]({image_dir}{chart.name}.png)", ""]
    if not run.metrics:
        lines += ["_No metrics.csv in this run (no CSV logger, or `fast_dev_run`, which disables loggers)._", ""]
    if run.tuning:
        lines += ["## Tuning", ""]
        lr = run.tuning.get("lr_find")
        if lr:
            lines.append(
                f"- LR finder: suggested lr {_fmt(lr.get('suggested_lr'))} (was {_fmt(lr.get('original_lr'))}); "
                f"{'applied to this run' if lr.get('applied') else 'not applied'}. Curve: `lr_find.png`."
            )
        bs = run.tuning.get("batch_size_find")
        if bs:
            lines.append(
                f"- Batch-size finder: {bs.get('attribute', 'batch_size')} {bs.get('original_batch_size')} → "
                f"{bs.get('batch_size')} on {bs.get('accelerator')}."
            )
        lines.append("")
    settings = _settings_rows(run)
    if settings:
        lines += ["## Configuration", "", *_table(["key", "value"], settings), ""]
        full = yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False)
        lines += ["<details><summary>Full config.yaml</summary>", "", "```yaml", full.rstrip(), "```", "</details>", ""]
    if run.provenance:
        lines += ["## Provenance", "", *_table(["", ""], _provenance_rows(run.provenance)), ""]
    wandb_runs = _wandb_runs(run.path)
    files = _notable_files(run.path)
    if wandb_runs or files:
        lines += ["## Files", ""]
        for path in wandb_runs:
            rel = path.relative_to(run.path)
            if path.name.startswith("offline-run-"):
                lines.append(f"- W&B offline run `{rel}`: upload with `wandb sync {path}` (or `make sync`)")
            else:
                lines.append(f"- W&B run `{rel}`")
        lines += [f"- `{name}`" for name in files]
        lines.append("")
    lines.append(f"_Written by `lightscale report` on {time.strftime('%Y-%m-%d %H:%M')}._")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs for one run into ``out_dir`` (default: the run directory)."""
    from lightscale import report_plots

    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    charts = run_charts(run)
    for chart in charts:
        report_plots.save(chart, out / f"{chart.name}.png")
    path = out / REPORT_FILE
    path.write_text(render_report(run, charts))
    return path


def write_report_safely(run_dir: str | Path) -> Path | None:
    """:func:`write_report` for the end of a run: a failure warns and never fails the run."""
    try:
        return write_report(run_dir)
    except Exception as error:
        warnings.warn(f"lightscale: could not write the run report in {run_dir}: {error!r}", stacklevel=2)
        return None


# ------------------------------------------------------------------------------------------------- comparison
def _label_runs(runs: Sequence[RunData], diff: dict[str, list[Any]]) -> None:
    """Short legend labels: the run id (``<hex>`` of ``<time>-<hex>``, with the experiment name when runs come
    from several), plus the differing settings when there are at most three."""
    ids = [run.path.name.rsplit("-", 1)[-1] if _RUN_NAME.fullmatch(run.path.name) else run.path.name for run in runs]
    if len({run.path.parent.name for run in runs}) > 1:
        ids = [f"{run.path.parent.name}/{id_}" for run, id_ in zip(runs, ids, strict=True)]
    if len(set(ids)) < len(ids):
        ids = [str(run.path) for run in runs]
    shown = list(diff) if len(diff) <= 3 else []
    for index, run in enumerate(runs):
        extra = ", ".join(f"{key.rsplit('.', 1)[-1]}={_fmt(diff[key][index])}" for key in shown)
        run.label = f"{ids[index]} ({extra})" if extra else ids[index]


def _final_rows(runs: Sequence[RunData]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    bests = [best_validation(run) for run in runs]
    monitor = next((b.key for b in bests if b), None)
    if monitor:
        rows.append([f"best {monitor}", *[b.value if b else None for b in bests]])
        rows.append(["best at step", *[b.step if b else None for b in bests]])
    keys = sorted({k for run in runs for k in run.metrics if k.startswith(("val/", "test/")) and "_step" not in k})
    for key in keys:
        rows.append([f"last {key}" if key.startswith("val/") else key, *[_last(run.metrics.get(key)) for run in runs]])
    train = [(_first(run.metrics, TRAIN_EPOCH_LOSS_KEYS + TRAIN_LOSS_KEYS) or (None, None))[1] for run in runs]
    rows.append(["last train loss", *[_last(series) for series in train]])
    rows.append(["steps", *[run.summary.get("global_step") for run in runs]])
    rows.append(["fit time (s)", *[run.summary.get("fit_seconds") for run in runs]])
    rows.append(["samples/s", *[run.summary.get("train_samples_per_sec") for run in runs]])
    rows.append(["parameters", *[(run.provenance.get("parameters") or {}).get("total") for run in runs]])
    return [row for row in rows if any(value is not None for value in row[1:])]


def _bold_best(rows: list[list[Any]]) -> list[list[Any]]:
    out = []
    for row in rows:
        name, values = row[0], row[1:]
        cells: list[Any] = [name, *[_cell(v) for v in values]]
        numeric = [(i, v) for i, v in enumerate(values) if isinstance(v, float) and math.isfinite(v)]
        metric = name.split(" ")[-1]
        if len(numeric) > 1 and metric.startswith(("val/", "test/")):
            pick = min if lower_is_better(metric) else max
            index, best = pick(numeric, key=lambda item: item[1])
            if sum(value == best for _, value in numeric) == 1:  # a tie has no winner
                cells[index + 1] = f"**{cells[index + 1]}**"
        out.append(cells)
    return out


def render_comparison(runs: Sequence[RunData], charts: Sequence[Chart], diff: dict[str, list[Any]]) -> str:
    labels = [run.label for run in runs]
    lines = [f"# Comparison of {len(runs)} runs", ""]
    lines += _table(["run", "directory", "verdict"], [[r.label, f"`{r.path}`", overfitting_verdict(r)] for r in runs])
    lines += ["", "## Final metrics", "", "(best value per row in bold)", ""]
    lines += _table(["", *labels], _bold_best(_final_rows(runs)))
    lines += ["", "## Config keys that differ", ""]
    if diff:
        lines += _table(["key", *labels], [[f"`{key}`", *values] for key, values in diff.items()])
    else:
        lines.append("All configs are identical (apart from run directories).")
    prov = [flatten({k: v for k, v in run.provenance.items() if k in ("git", "versions", "hardware")}) for run in runs]
    prov_keys = [k for k in sorted({k for p in prov for k in p}) if len({json.dumps(p.get(k)) for p in prov}) > 1]
    if prov_keys:
        lines += ["", "## Provenance that differs", ""]
        lines += _table(["", *labels], [[k, *[p.get(k) for p in prov]] for k in prov_keys])
    for chart in charts:
        lines += ["", f"## {chart.title}", "", f"![{chart.title}]({chart.name}.png)"]
    lines += ["", f"_Written by `lightscale report` on {time.strftime('%Y-%m-%d %H:%M')}._"]
    return "\n".join(lines) + "\n"


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``comparison.md`` and overlay PNGs for several runs into ``out_dir``."""
    from lightscale import report_plots

    runs = [read_run(path) for path in run_dirs]
    diff = config_diff(runs)
    _label_runs(runs, diff)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = comparison_charts(runs)
    for chart in charts:
        report_plots.save(chart, out / f"{chart.name}.png")
    path = out / COMPARISON_FILE
    path.write_text(render_comparison(runs, charts, diff))
    return path


# ------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightscale report",
        description=(
            "Write report.md and PNG charts (loss, metrics, learning rate, speed) for a run directory, or, given "
            "several, a comparison (comparison.md) that overlays their curves and tabulates final metrics and "
            "the config keys that differ. A folder of runs (e.g. runs/digits) stands for every run in it."
        ),
    )
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="run directories (or folders of runs); none: the newest run under runs/ that has results",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: the run directory itself; for a comparison runs/compare-<time>)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``lightscale report RUN_DIR [RUN_DIR ...] [--out DIR]``; prints the path of what it wrote."""
    args = build_parser().parse_args(sys.argv[2:] if argv is None else list(argv))
    try:
        run_dirs = expand_run_dirs(args.run_dirs) if args.run_dirs else [newest_run()]
        if len(run_dirs) == 1:
            path = write_report(run_dirs[0], args.out)
        else:
            out = args.out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
            path = write_comparison(run_dirs, out)
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"lightscale report: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"lightscale: wrote {path}")


if __name__ == "__main__":  # `python -m lightscale.report ...`: the same, without importing Lightning (fast)
    main(sys.argv[1:])
