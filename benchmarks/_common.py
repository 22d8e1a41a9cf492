"""Shared by the benchmark scripts: result rows, the machine description, quiet environments, timing stats.

Every benchmark script prints its rows and, with ``--json PATH``, writes them for ``run_all.py``, which
collects them into one table. A row is a plain dict (see :func:`row`) so the JSON needs no schema.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightscale.core.hardware import cpu_name

REPO = Path(__file__).resolve().parents[1]
SKIPPED_NO_CUDA = "skipped: no CUDA device"


def row(
    bench: str,
    case: str,
    metric: str,
    value: float | str | None,
    unit: str = "",
    target: str = "",
    ok: bool | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One line of the table. ``ok`` is None where there is no target (or the row was skipped)."""
    return {
        "bench": bench,
        "case": case,
        "metric": metric,
        "value": value,
        "unit": unit,
        "target": target,
        "ok": ok,
        "note": note,
    }


def skipped(bench: str, case: str, metric: str, reason: str = SKIPPED_NO_CUDA, target: str = "") -> dict[str, Any]:
    return row(bench, case, metric, None, target=target, note=reason)


def fmt_value(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if unit in ("x", "ratio"):
            text = f"{value:.3f}"
        elif unit == "%":
            text = f"{value:.1f}"
        elif abs(value) >= 1000:
            text = f"{value:,.0f}"
        elif abs(value) >= 10:
            text = f"{value:.1f}"
        else:
            text = f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if unit not in ("", "ratio") else text


def status(r: dict[str, Any]) -> str:
    if r["value"] is None and r["note"].startswith("skipped"):
        return "skip"
    if r["ok"] is None:
        return ""
    return "PASS" if r["ok"] else "FAIL"


def table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as an aligned text table, or as a Markdown table."""
    head = ["benchmark", "case", "metric", "value", "target", "status", "note"]
    body = [
        [r["bench"], r["case"], r["metric"], fmt_value(r["value"], r["unit"]), r["target"], status(r), r["note"]]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in body]
    return "\n".join(out)


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def machine() -> dict[str, Any]:
    """What the figures were measured on (no heavy imports: versions come from package metadata)."""
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "python": platform.python_version(),
        "torch": version("torch"),
        "lightning": version("lightning"),
        "load_average": [round(x, 2) for x in load_average()],
    }


def quiet_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for benchmark subprocesses: W&B offline and silent, no stray run directory."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(extra or {})}
    env.pop("LIGHTSCALE_RUN_DIR", None)
    return env


def setup_quiet() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.pop("LIGHTSCALE_RUN_DIR", None)
    import warnings

    from lightscale.cli.main import silence_dependency_chatter

    silence_dependency_chatter()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*args parameter is intended to run from within Python.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks correctness, not speed")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (for run_all.py)")
    return parser


def finish(rows: list[dict[str, Any]], json_path: Path | None, extra: dict[str, Any] | None = None) -> int:
    """Print the rows, write them as JSON if asked; exit status 1 when a correctness check failed."""
    print(table(rows), flush=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"rows": rows, **(extra or {})}, indent=1) + "\n")
    failed = [r for r in rows if r.get("metric") == "losses match" and r.get("ok") is False]
    return 1 if failed else 0


def cuda_available() -> bool:
    """Whether a CUDA device is present, without importing torch in processes that do not need it."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    import torch

    return torch.cuda.is_available()
