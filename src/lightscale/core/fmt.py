"""How numbers, sizes and durations are written for people: log lines, reports, preflight summaries."""

import math
from typing import Any


def number(value: float) -> str:
    """Four significant digits; scientific notation for very small or very large magnitudes."""
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if abs(value) >= 1e5 or abs(value) < 1e-3 else f"{value:.4g}"


def value(item: Any) -> str:
    """Any config or metric value: ``-`` for none, thousands separators for integers, :func:`number` for floats."""
    if item is None:
        return "-"
    if isinstance(item, bool):
        return str(item).lower()
    if isinstance(item, int):
        return f"{item:,}"
    if isinstance(item, float):
        return number(item)
    return str(item)


def count(n: Any) -> str:
    """A parameter or sample count: ``65.8 K``, ``124.4 M``, ``1.2 B``."""
    if not isinstance(n, (int, float)):
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def gigabytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def duration(seconds: float) -> str:
    """``42.0 s`` under two minutes, then ``12m05s``, ``3h07m``."""
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
