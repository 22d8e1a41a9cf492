"""``lightscale report``: ``report.md`` and PNG charts that say at a glance how a run went, and comparisons.

- :mod:`~lightscale.report.data`: reading a run directory (``metrics.csv``, ``summary.json``, ...).
- :mod:`~lightscale.report.analysis`: what the metrics say (best validation, over-fitting).
- :mod:`~lightscale.report.charts`: the charts as plain data; :mod:`~lightscale.report.plots` draws them.
- :mod:`~lightscale.report.markdown`: the markdown of a report and of a comparison.
- :mod:`~lightscale.report.command`: writing them, and the command line.

Reads files only: imports :mod:`lightscale.core`, never torch or Lightning (matplotlib when drawing).
"""

from lightscale.report.charts import comparison_charts, run_charts
from lightscale.report.command import main, write_comparison, write_report, write_report_safely
from lightscale.report.data import RunData, expand_run_dirs, newest_run, read_metrics_csv, read_run
from lightscale.report.markdown import config_diff, flatten

__all__ = [
    "RunData",
    "comparison_charts",
    "config_diff",
    "expand_run_dirs",
    "flatten",
    "main",
    "newest_run",
    "read_metrics_csv",
    "read_run",
    "run_charts",
    "write_comparison",
    "write_report",
    "write_report_safely",
]
