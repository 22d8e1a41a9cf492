"""The debug and tuning presets in configs/debug do what their comments promise, on the digits experiment."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, run_cli, run_dirs
from helpers.wandb_offline import find_offline_runs
from lightscale.cli import LightscaleCLI
from lightscale.data import DigitsDataModule

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CSV_ONLY = str(CONFIGS / "logger" / "csv.yaml")  # W&B is not what these tests are about
FAST = ("--trainer.enable_model_summary", "false", "--run.report", "false")


def preset(name: str) -> str:
    return str(CONFIGS / "debug" / f"{name}.yaml")


def column(run_dir: Path, key: str) -> list[float]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def the_run() -> Path:
    (run_dir,) = run_dirs()
    return run_dir


def test_fast_dev_run_runs_one_batch_and_writes_no_logs() -> None:
    assert run_cli("fit", "--config", DIGITS, "--config", preset("fast_dev_run")) == 0
    run_dir = the_run()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 1 and "test_metrics" in summary
    assert not find_offline_runs(run_dir) and not (run_dir / "metrics.csv").exists()
    assert "No metrics.csv" in (run_dir / "report.md").read_text()


def test_overfit_batches_memorises_one_batch() -> None:
    args = ("--config", preset("overfit_batches"), "--config", CSV_ONLY, "--trainer.max_epochs", "40", *FAST)
    assert run_cli("fit", "--config", DIGITS, *args) == 0
    losses = column(the_run(), "train/loss")
    assert len(losses) == 40  # one batch per epoch, logged every step
    assert losses[0] > 1.5 and losses[-1] < 0.05, (losses[0], losses[-1])


@pytest.mark.slow
def test_limit_batches_runs_short_epochs() -> None:
    args = ("--config", preset("limit_batches"), "--config", CSV_ONLY, "--data.batch_size", "16", *FAST)
    # batch 16: 79 training, 17 validation, 17 test batches without the limits
    assert run_cli("fit", "--config", DIGITS, *args, "--trainer.max_epochs", "2") == 0
    summary = json.loads((the_run() / "summary.json").read_text())
    assert (summary["global_step"], summary["epochs"]) == (2 * 20, 2)
    assert summary["train_samples"] == 2 * 20 * 16
    assert len(column(the_run(), "val/loss")) == 2 and len(column(the_run(), "test/loss")) == 1


def test_anomaly_preset_turns_on_autograd_anomaly_detection() -> None:
    cli = LightscaleCLI(args=["--config", DIGITS, "--config", preset("anomaly"), "--config", CSV_ONLY], run=False)
    assert cli.trainer._detect_anomaly is True


def test_profiler_writes_its_table_and_trace_into_the_run_dir() -> None:
    args = ("--config", preset("profiler"), "--config", CSV_ONLY, "--trainer.limit_train_batches", "6", *FAST)
    assert run_cli("fit", "--config", DIGITS, *args, "--run.test_after_fit", "false") == 0
    run_dir = the_run()
    table = (run_dir / "fit-profile.txt").read_text()
    assert "Self CPU" in table and "ProfilerStep" in table
    traces = list(run_dir.glob("*.pt.trace.json"))
    assert traces and all(json.loads(trace.read_text())["traceEvents"] for trace in traces)
    assert {p.name for p in Path.cwd().iterdir()} == {"runs"}  # nothing outside the run directory


def test_lr_finder_applies_its_suggestion_and_records_it(tmp_path: Path) -> None:
    # The preset's callback with fewer steps (the preset itself is parsed against every experiment in test_cli).
    small = yaml.safe_load(Path(preset("lr_find")).read_text())
    small["trainer"]["callbacks+"][0]["init_args"]["num_training_steps"] = STEPS = 20
    (tmp_path / "lr_find_small.yaml").write_text(yaml.safe_dump(small))
    args = ("--config", "lr_find_small.yaml", "--config", CSV_ONLY, "--run.test_after_fit", "false", *FAST)
    limits = ("--trainer.max_epochs", "2", "--trainer.limit_train_batches", "10", "--trainer.limit_val_batches", "1")
    assert run_cli("fit", "--config", DIGITS, *args, *limits) == 0
    run_dir = the_run()
    result = json.loads((run_dir / "tuning.json").read_text())["lr_find"]
    suggested = result["suggested_lr"]
    assert result["applied"] and result["original_lr"] == 0.003 and len(result["lr"]) == STEPS
    assert 1e-6 <= suggested <= 1.0 and (run_dir / "lr_find.png").is_file()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["lr"] == suggested
    # The OneCycle schedule was rebuilt around the new LR (Lightning's callback alone leaves it at 0.003).
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["max_lr"] == suggested
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.003


@pytest.mark.slow
def test_batch_size_finder_applies_its_result_and_records_it(tmp_path: Path) -> None:
    small = yaml.safe_load(Path(preset("batch_size_find")).read_text())
    small["trainer"]["callbacks+"][0]["init_args"]["init_val"] = 512  # fewer trials: 512, 1024, 2048
    (tmp_path / "batch_size_find_small.yaml").write_text(yaml.safe_dump(small))
    args = ("--config", preset("limit_batches"), "--config", "batch_size_find_small.yaml", "--config", CSV_ONLY)
    assert run_cli("fit", "--config", DIGITS, *args, "--trainer.max_epochs", "2", *FAST) == 0
    run_dir = the_run()
    result = json.loads((run_dir / "tuning.json").read_text())["batch_size_find"]
    # On a CPU nothing runs out of memory: the search stops once a batch holds the whole train split.
    assert result["original_batch_size"] == 128 and result["batch_size"] == 2048
    data = DigitsDataModule()
    data.setup()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train_samples"] == 2 * len(data.splits["train"])  # one batch per epoch
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2
    assert checkpoint["lr_schedulers"][0]["total_steps"] == 2  # schedule rebuilt for the new number of steps
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == 2048
