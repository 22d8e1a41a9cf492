"""``lightscale report [RUN_DIR ...] [--out DIR]``: write ``report.md`` and PNG charts for a run (by default the
newest run with results), or, given several, a comparison that overlays their curves and tabulates their
results and the config keys that differ. A folder holding run directories (``runs/digits``) stands for all of
them. The CLI writes a report at the end of every run.

Everything is read from files every run has, even with W&B disabled; nothing here imports torch or Lightning."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import yaml

from lightscale.report.charts import comparison_charts, run_charts
from lightscale.report.data import expand_run_dirs, newest_run, read_run
from lightscale.report.markdown import config_diff, label_runs, render_comparison, render_report
from lightscale.report.plots import save

REPORT_FILE = "report.md"
COMPARISON_FILE = "comparison.md"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNGs for one run into ``out_dir`` (default: the run directory)."""
    run = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path
    out.mkdir(parents=True, exist_ok=True)
    charts = run_charts(run)
    for chart in charts:
        save(chart, out / f"{chart.name}.png")
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


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``comparison.md`` and overlay PNGs for several runs into ``out_dir``."""
    runs = [read_run(path) for path in run_dirs]
    diff = config_diff(runs)
    label_runs(runs, diff)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = comparison_charts(runs)
    for chart in charts:
        save(chart, out / f"{chart.name}.png")
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
