"""``report.md`` and ``comparison.md``: tables of results, settings, provenance and configs that differ."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightscale.core import fmt
from lightscale.core.run_dir import run_label
from lightscale.report.analysis import (
    TRAIN_EPOCH_LOSS_KEYS,
    TRAIN_LOSS_KEYS,
    Best,
    best_validation,
    first_of,
    last_value,
    lower_is_better,
    overfitting_verdict,
    step_and_epoch,
    train_loss_near,
    value_at,
)
from lightscale.report.data import RunData
from lightscale.report.plots import Chart


# --------------------------------------------------------------------------------------------------- markdown
def _cell(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else fmt.value(value)
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
        rows.append(
            ("parameters", f"{fmt.count(params.get('total'))} ({fmt.count(params.get('trainable'))} trainable)")
        )
    slurm = prov.get("slurm")
    if slurm:
        parts = [f"job {slurm.get('job_id')}"]
        if slurm.get("array_job_id") is not None:
            parts.append(f"array {slurm.get('array_job_id')}_{slurm.get('array_task_id')}")
        parts.append(f"restarts {slurm.get('restart_count', 0)}")
        rows.append(("SLURM", ", ".join(parts)))
    return rows


def _results_rows(run: RunData, best: Best | None) -> list[tuple[str, Any, Any]]:
    """``(metric, at best validation, last)`` for validation metrics, then test and train loss."""
    rows: list[tuple[str, Any, Any]] = []
    val_keys = sorted(
        (k for k in run.metrics if k.startswith("val/") and not k.endswith("_step")),
        key=lambda k: (k != (best.key if best else "val/loss"), k),
    )
    for key in val_keys:
        at_best = value_at(run.metrics[key], best.step) if best else None
        rows.append((key, at_best, last_value(run.metrics[key])))
    for key in sorted(k for k in run.metrics if k.startswith("test/")):
        rows.append((key, last_value(run.metrics[key]), "-"))
    train = first_of(run.metrics, TRAIN_EPOCH_LOSS_KEYS + TRAIN_LOSS_KEYS)
    if train is not None:
        rows.append((train[0], train_loss_near(run, best.step) if best else None, last_value(train[1])))
    return rows


def _facts(run: RunData) -> str:
    s = run.summary
    parts = []
    if "global_step" in s:
        parts.append(f"{s['global_step']:,} steps")
    if "epochs" in s:
        parts.append(f"{s['epochs']} epochs")
    if s.get("fit_seconds") is not None:
        parts.append(f"fit {fmt.duration(s['fit_seconds'])}")
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
        lines += [
            f"Best checkpoint by `{best.key}`: {fmt.value(best.value)} at {step_and_epoch(best.step, best.epoch)}.",
            "",
        ]
    rows = _results_rows(run, best)
    if rows:
        at = f"at best ({step_and_epoch(best.step, best.epoch)})" if best else "at best"
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
                f"- LR finder: suggested lr {fmt.value(lr.get('suggested_lr'))} "
                f"(was {fmt.value(lr.get('original_lr'))}); "
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


# ------------------------------------------------------------------------------------------------- comparison
def label_runs(runs: Sequence[RunData], diff: dict[str, list[Any]]) -> None:
    """Short legend labels: the run id (``<hex>`` of ``<time>-<hex>``, with the experiment name when runs come
    from several), plus the differing settings when there are at most three."""
    ids = [run_label(run.path) for run in runs]
    if len({run.path.parent.name for run in runs}) > 1:
        ids = [f"{run.path.parent.name}/{id_}" for run, id_ in zip(runs, ids, strict=True)]
    if len(set(ids)) < len(ids):
        ids = [str(run.path) for run in runs]
    shown = list(diff) if len(diff) <= 3 else []
    for index, run in enumerate(runs):
        extra = ", ".join(f"{key.rsplit('.', 1)[-1]}={fmt.value(diff[key][index])}" for key in shown)
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
        rows.append(
            [f"last {key}" if key.startswith("val/") else key, *[last_value(run.metrics.get(key)) for run in runs]]
        )
    train = [(first_of(run.metrics, TRAIN_EPOCH_LOSS_KEYS + TRAIN_LOSS_KEYS) or (None, None))[1] for run in runs]
    rows.append(["last train loss", *[last_value(series) for series in train]])
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
