"""Run reports and comparisons, on run directories written by hand (no training): the files appear, the charts
plot exactly the logged values, the over-fitting verdict reads the curves right, and a comparison tabulates
exactly the config keys that differ."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from lightscale.report import (
    comparison_charts,
    config_diff,
    expand_run_dirs,
    read_run,
    run_charts,
    write_comparison,
    write_report,
)
from lightscale.report.analysis import overfitting_verdict
from lightscale.report.command import COMPARISON_FILE, REPORT_FILE
from lightscale.report.plots import draw

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 10


def write_run(
    run_dir: Path,
    *,
    lr: float = 0.003,
    epochs: int = 6,
    overfit_after: int | None = 2,
    extra_config: dict | None = None,
) -> Path:
    """A run directory as the CLI leaves it: metrics.csv (Lightning's CSVLogger layout), config.yaml, summary.json.

    Train loss falls steadily; validation loss falls until epoch ``overfit_after`` and rises after it."""
    run_dir.mkdir(parents=True)
    columns = ["epoch", "lr-AdamW", "step", "test/acc", "test/loss", "time/epoch_seconds", "throughput/samples_per_sec",
               "train/acc", "train/loss_epoch", "train/loss_step", "val/acc", "val/loss"]  # fmt: skip
    rows: list[dict] = []
    for epoch in range(epochs):
        for step in range(epoch * STEPS_PER_EPOCH + 4, (epoch + 1) * STEPS_PER_EPOCH, 5):
            rows.append({"step": step, "lr-AdamW": lr * (1 - step / (epochs * STEPS_PER_EPOCH))})
            rows.append({"step": step, "epoch": epoch, "train/loss_step": 2.0 * math.exp(-step / 15) + 0.01})
            rows.append({"step": step + 1, "throughput/samples_per_sec": 1000.0 + step})
        end = (epoch + 1) * STEPS_PER_EPOCH - 1
        bottom = overfit_after if overfit_after is not None else epochs
        val = 1.0 / (epoch + 1) if epoch <= bottom else 1.0 / (bottom + 1) + 0.1 * (epoch - bottom)
        rows.append({"step": end, "epoch": epoch, "val/loss": val, "val/acc": 0.5 + 0.05 * min(epoch, bottom)})
        rows.append({"step": end + 1, "epoch": epoch, "time/epoch_seconds": 3.0 + 0.1 * epoch})
        rows.append({"step": end, "epoch": epoch, "train/loss_epoch": 2.0 * math.exp(-end / 15), "train/acc": 0.6})
    last = epochs * STEPS_PER_EPOCH
    rows.append({"step": last, "epoch": epochs, "test/loss": 0.4, "test/acc": 0.8})
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    config = {
        "seed_everything": 42,
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(run_dir),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}}],
        },
        "model": {"class_path": "lightscale.models.Classifier", "init_args": {"lr": lr, "channels": [32, 64]}},
        "data": {"class_path": "lightscale.data.DigitsDataModule", "init_args": {"batch_size": 64}},
        "run": {"name": "digits", "dir": None},
        "checkpoint": {"dirpath": str(run_dir / "checkpoints"), "monitor": "val/loss", "mode": "min"},
    }
    for key, value in (extra_config or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = {"global_step": last, "epochs": epochs, "fit_seconds": 12.5, "train_samples_per_sec": 1020.0}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def logged(run_dir: Path, key: str) -> list[tuple[float, float]]:
    """``(step, value)`` of one metrics.csv column, read independently of the report code."""
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row[key]]


def test_report_files_exist_and_charts_plot_exactly_the_logged_values(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs" / "digits" / "20261123-120000-abc123")
    path = write_report(run_dir)
    assert path == run_dir / REPORT_FILE
    text = path.read_text()
    charts = run_charts(read_run(run_dir))
    assert [chart.name for chart in charts] == ["loss", "metrics", "lr", "throughput"]
    for chart in charts:
        png = run_dir / f"{chart.name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
        assert f"]({chart.name}.png)" in text
        figure = draw(chart)
        for panel, axes in zip(chart.panels, figure.axes, strict=False):
            drawn = {line.get_label(): line for line in axes.get_lines()}
            for curve in panel.curves:
                if curve.key is not None:
                    assert list(zip(curve.x, curve.y, strict=True)) == logged(run_dir, curve.key), curve.key
                line = drawn[curve.label]  # what matplotlib draws is the curve's data
                assert list(line.get_xdata()) == curve.x and list(line.get_ydata()) == curve.y
    loss_keys = {curve.key for curve in charts[0].panels[0].curves}
    assert {"train/loss_step", "train/loss_epoch", "val/loss", "test/loss"} <= loss_keys
    assert {curve.key for panel in charts[1].panels for curve in panel.curves} == {"train/acc", "val/acc", "test/acc"}
    assert [curve.key for curve in charts[2].panels[0].curves] == ["lr-AdamW"]
    assert [p.title for p in charts[3].panels] == ["throughput/samples_per_sec", "time/epoch_seconds"]


def test_overfitting_is_pointed_out_where_validation_turns_up(tmp_path: Path) -> None:
    run = read_run(write_run(tmp_path / "a", epochs=6, overfit_after=2))
    verdict = overfitting_verdict(run)
    assert verdict.startswith("**Over-fitting**") and "epoch 2, step 29" in verdict
    (panel,) = run_charts(run)[0].panels
    assert panel.shade is not None and panel.shade[:2] == (29, 59)  # from the best validation to the last
    assert [(m.x, m.y) for m in panel.marks] == [(29, pytest.approx(1 / 3))]
    improving = read_run(write_run(tmp_path / "b", epochs=4, overfit_after=None))
    assert "still falling" in overfitting_verdict(improving)
    assert run_charts(improving)[0].panels[0].shade is None


def test_comparison_tabulates_exactly_the_config_keys_that_differ(tmp_path: Path) -> None:
    a = write_run(tmp_path / "runs" / "digits" / "20261123-120000-aaaaaa", lr=0.003, epochs=6)
    b = write_run(tmp_path / "runs" / "digits" / "20261123-130000-bbbbbb", lr=0.01, epochs=4, overfit_after=None)
    runs = [read_run(a), read_run(b)]
    diff = config_diff(runs)
    # default_root_dir, logger save_dir and checkpoint dirpath differ only by the run directory: not listed.
    assert diff == {"model.init_args.lr": [0.003, 0.01], "trainer.max_epochs": [6, 4]}
    out = tmp_path / "compare"
    path = write_comparison([a, b], out)
    assert path == out / COMPARISON_FILE
    text = path.read_text()
    section = text.split("## Config keys that differ", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `")]
    assert table == ["| `model.init_args.lr` | 0.003 | 0.01 |", "| `trainer.max_epochs` | 6 | 4 |"]
    assert "aaaaaa (lr=0.003, max_epochs=6)" in text and "bbbbbb (lr=0.01, max_epochs=4)" in text
    for name in ("compare_loss", "compare_metrics", "compare_lr", "compare_throughput"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC and f"({name}.png)" in text
    (val_panel, train_panel) = comparison_charts(runs)[0].panels
    for curve, run_dir in zip(val_panel.curves, (a, b), strict=True):
        assert list(zip(curve.x, curve.y, strict=True)) == logged(run_dir, "val/loss")
    assert [len(c.x) for c in train_panel.curves] == [
        len(logged(a, "train/loss_step")),
        len(logged(b, "train/loss_step")),
    ]
    final = text.split("## Final metrics", 1)[1].split("\n## ", 1)[0]
    assert "| test/loss | 0.4 | 0.4 |" in final  # a tie: nothing in bold
    assert "| best val/loss | 0.3333 | **0.25** |" in final and "| last val/acc | 0.6 | **0.65** |" in final


def test_report_command_single_comparison_and_folder_of_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = write_run(tmp_path / "runs" / "digits" / "20261123-120000-aaaaaa")
    b = write_run(tmp_path / "runs" / "digits" / "20261123-130000-bbbbbb", lr=0.01)
    assert run_cli("report", str(a)) == 0
    assert (a / REPORT_FILE).is_file() and (a / "loss.png").is_file()
    assert run_cli("report", str(a), str(b), "--out", str(tmp_path / "cmp")) == 0
    assert (tmp_path / "cmp" / COMPARISON_FILE).is_file()
    assert expand_run_dirs([tmp_path / "runs" / "digits"]) == [a, b]
    assert run_cli("report", str(tmp_path / "runs" / "digits")) == 0  # folder of runs: a comparison
    (compare,) = Path("runs").glob("compare-*")
    assert "model.init_args.lr" in (compare / COMPARISON_FILE).read_text()
    capsys.readouterr()
    assert run_cli("report", str(tmp_path / "missing")) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_run_without_metrics_still_gets_a_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"global_step": 1, "epochs": 1}))
    text = write_report(run_dir).read_text()
    assert "No metrics.csv" in text and not list(run_dir.glob("*.png"))
