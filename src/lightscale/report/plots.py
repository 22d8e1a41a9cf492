"""Draw report charts with matplotlib (Agg backend, imported only here so the CLI starts fast).

A :class:`Chart` is plain data (built in :mod:`lightscale.report`); this module only turns it into a figure,
so tests can compare what is plotted with what was logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Style = Literal["line", "faint", "points", "markers", "dashed"]


@dataclass
class Curve:
    """One plotted series: ``x`` (usually the global step) and ``y`` exactly as logged (or a marked derivation,
    like a smoothed copy labelled so)."""

    label: str
    x: list[float]
    y: list[float]
    style: Style = "line"
    color: str | None = None
    key: str | None = None
    """The logged metric (``metrics.csv`` column) the values are, or None for a derived curve (smoothing)."""


@dataclass
class Mark:
    """An annotated point (e.g. the best validation)."""

    x: float
    y: float
    text: str


@dataclass
class Panel:
    title: str
    ylabel: str
    curves: list[Curve] = field(default_factory=list)
    xlabel: str = "step"
    log_y: bool = False
    y_from_zero: bool = False
    marks: list[Mark] = field(default_factory=list)
    shade: tuple[float, float, str] | None = None
    """``(x0, x1, label)``: a region to highlight, e.g. where validation loss rises (over-fitting)."""


@dataclass
class Chart:
    """One PNG: ``<name>.png`` with one or more panels."""

    name: str
    title: str
    panels: list[Panel] = field(default_factory=list)


_STYLES: dict[str, dict[str, Any]] = {
    "line": {"linewidth": 1.8},
    "faint": {"linewidth": 1.0, "alpha": 0.35},
    "dashed": {"linewidth": 1.4, "linestyle": "--"},
    "markers": {"linewidth": 1.8, "marker": "o", "markersize": 4},
    "points": {"linestyle": "none", "marker": "*", "markersize": 11},
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(chart: Chart) -> Any:
    """A matplotlib Figure for ``chart``; each curve is one ``Line2D`` labelled with ``curve.label``."""
    plt = _pyplot()
    n = max(1, len(chart.panels))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    size = (9.0, 5.0) if n == 1 else (12.0, 3.8 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(chart.panels):
            ax.set_visible(False)
            continue
        _draw_panel(ax, chart.panels[index])
    fig.suptitle(chart.title, fontsize=13, fontweight="bold")
    fig.tight_layout()
    return fig


def _draw_panel(ax: Any, panel: Panel) -> None:
    for curve in panel.curves:
        kwargs = dict(_STYLES[curve.style])
        if curve.color:
            kwargs["color"] = curve.color
        if curve.style == "line" and len(curve.x) <= 30:
            kwargs.update(marker="o", markersize=3.5)
        ax.plot(curve.x, curve.y, label=curve.label, **kwargs)
    if panel.shade is not None:
        x0, x1, label = panel.shade
        ax.axvspan(x0, x1, color="tab:red", alpha=0.08, label=label)
    xs = [x for curve in panel.curves for x in curve.x]
    for mark in panel.marks:
        ax.plot([mark.x], [mark.y], marker="*", markersize=15, color="gold", markeredgecolor="black", zorder=5)
        ax.axvline(mark.x, color="gray", linestyle=":", linewidth=1)
        right_side = bool(xs) and mark.x > min(xs) + 0.6 * (max(xs) - min(xs))  # label to the left, not clipped
        ax.annotate(
            mark.text,
            (mark.x, mark.y),
            textcoords="offset points",
            xytext=(-10, 12) if right_side else (10, 12),
            ha="right" if right_side else "left",
            fontsize=9,
            bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "alpha": 0.85, "edgecolor": "gray"},
        )
    if panel.log_y:
        ax.set_yscale("log")
    elif panel.y_from_zero:
        ax.set_ylim(bottom=0)
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if any(curve.label for curve in panel.curves):
        ax.legend(fontsize=8, loc="best")


def save(chart: Chart, path: str | Path, dpi: int = 110) -> Path:
    """Draw ``chart`` and write it as a PNG."""
    plt = _pyplot()
    fig = draw(chart)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
