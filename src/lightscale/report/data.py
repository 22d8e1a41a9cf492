"""Reading a run directory: ``metrics.csv`` as series per column, ``config.yaml``, ``summary.json``,
``provenance.json`` and ``tuning.json``; finding the runs a command names."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


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
