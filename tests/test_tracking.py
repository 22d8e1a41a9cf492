"""Experiment tracking: what one offline run really wrote to W&B, read back from its ``.wandb`` file.

One short digits fit (in a temporary git repository with an uncommitted change, inside a fake SLURM array job)
is shared by the tests below; they check the nested config, the W&B run fields, provenance, the logged
history (train loss at the logging cadence, validation per epoch, LR, throughput, epoch time), the best
checkpoint's metrics in the summary, the quiet-mode progress lines and the end-of-run report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar

from conftest import CONFIGS, run_cli, run_dirs
from helpers.wandb_offline import OfflineRun, find_offline_runs, read_offline_run
from lightscale.callbacks import LineLogger, ProgressBar
from lightscale.cluster.slurm import job_info
from lightscale.models import Classifier
from lightscale.report import flatten, read_run, run_charts
from lightscale.tracking.progress import progress_settings
from lightscale.tracking.provenance import _without_credentials, git_info

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
EPOCHS, BATCHES, EVERY = 3, 6, 2
SHORT = (
    "--trainer.max_epochs", str(EPOCHS),
    "--trainer.limit_train_batches", str(BATCHES),
    "--trainer.limit_val_batches", "2",
    "--trainer.limit_test_batches", "2",
    "--trainer.log_every_n_steps", str(EVERY),
    "--trainer.enable_model_summary", "false",
)  # fmt: skip
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2", "SLURM_RESTART_COUNT": "1"}
LOGGERS = """
trainer:
  logger:
    - class_path: lightscale.loggers.WandbLogger
      init_args:
        project: lightscale-tests
        tags: [baseline, digits]
        group: sweep-7
        job_type: train
        notes: tracking test run
        log_model: true   # offline: must warn and carry on, not crash
    - class_path: lightning.pytorch.loggers.CSVLogger
      init_args:
        save_dir: .
"""


@dataclass
class Tracked:
    run_dir: Path
    wandb: OfflineRun
    stdout: str
    warnings: list[str]
    commit: str


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    work = tmp_path_factory.mktemp("tracked")
    _git(work, "init", "-q", "-b", "main")
    (work / "train_notes.txt").write_text("first\n")
    _git(work, "add", "train_notes.txt")
    _git(work, "commit", "-q", "-m", "initial")
    (work / "train_notes.txt").write_text("first\nuncommitted edit\n")
    (work / "loggers.yaml").write_text(LOGGERS)
    commit = _git(work, "rev-parse", "HEAD").strip()
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.chdir(work)
        for key, value in SLURM.items():
            mp.setenv(key, value)
        with contextlib.redirect_stdout(out):
            code = run_cli("fit", "--config", DIGITS, "--config", "loggers.yaml", *SHORT)
        assert code == 0
        (run_dir,) = run_dirs()
        run_dir = run_dir.resolve()
    os.environ.pop("LIGHTSCALE_RUN_DIR", None)
    (offline,) = find_offline_runs(run_dir)
    return Tracked(run_dir, read_offline_run(offline), out.getvalue(), [str(w.message) for w in caught], commit)


def _csv_column(path: Path, key: str) -> list[tuple[int, float]]:
    with path.open(newline="") as handle:
        return [(int(row["step"]), float(row[key])) for row in csv.DictReader(handle) if row.get(key)]


def test_wandb_config_is_the_full_nested_config(tracked: Tracked) -> None:
    config = tracked.wandb.config
    assert config["model"]["init_args"]["lr"] == 0.003
    assert config["data"]["init_args"]["batch_size"] == 128
    assert config["trainer"]["max_epochs"] == EPOCHS
    assert config["checkpoint"]["monitor"] == "val/loss"
    saved = yaml.safe_load((tracked.run_dir / "config.yaml").read_text())
    logged, written = flatten({k: config[k] for k in saved}), flatten(saved)
    assert {key: logged.get(key) for key in written} == written  # every key of config.yaml, same values
    assert set(logged) - set(written) == {"model.init_args.num_classes"}  # plus the linked value
    assert set(config) == set(saved) | {"provenance"}  # no flat duplicates of the hparams at the top level


def test_wandb_run_has_tags_group_job_type_and_notes_from_the_config(tracked: Tracked) -> None:
    run = tracked.wandb
    assert run.tags == ["baseline", "digits"]
    assert (run.group, run.job_type, run.notes, run.project) == (
        "sweep-7",
        "train",
        "tracking test run",
        "lightscale-tests",
    )
    assert run.exit_code == 0


def test_offline_log_model_warns_instead_of_failing(tracked: Tracked) -> None:
    assert any("log_model needs mode=online" in message for message in tracked.warnings)
    assert not list(tracked.run_dir.rglob("*artifact*"))


def test_provenance_is_logged_and_saved(tracked: Tracked) -> None:
    prov = tracked.wandb.config["provenance"]
    assert prov == json.loads((tracked.run_dir / "provenance.json").read_text())
    git = prov["git"]
    assert git["commit"] == tracked.commit and git["branch"] == "main" and git["dirty"] is True
    diff = (tracked.run_dir / git["diff_file"]).read_text()
    assert "+uncommitted edit" in diff and "train_notes.txt" in diff
    assert prov["command"].startswith("lightscale fit --config ") and "--trainer.max_epochs 3" in prov["command"]
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["versions"]["lightning"] and prov["versions"]["python"]
    assert prov["versions"]["cuda"] == torch.version.cuda
    assert prov["hardware"]["accelerator"] == "CPUAccelerator" and prov["hardware"]["world_size"] == 1
    expected = sum(p.numel() for p in Classifier().parameters())
    assert prov["parameters"] == {"total": expected, "trainable": expected, "non_trainable": 0}
    assert prov["slurm"] == {"job_id": 4242, "array_job_id": 4240, "array_task_id": 2, "restart_count": 1}


def test_history_has_train_loss_at_the_cadence_and_val_per_epoch(tracked: Tracked) -> None:
    run = tracked.wandb
    steps = EPOCHS * BATCHES
    train = run.metric("train/loss")
    assert len(train) == steps // EVERY
    assert [row["trainer/global_step"] for row in run.history if "train/loss" in row] == list(
        range(EVERY - 1, steps, EVERY)
    )
    val = [row for row in run.history if "val/loss" in row]
    assert [row["epoch"] for row in val] == list(range(EPOCHS))
    assert all({"val/acc", "val/f1"} <= set(row) for row in val)
    assert len(run.metric("lr-AdamW")) == steps // EVERY
    epoch_times = run.metric("time/epoch_seconds")
    assert len(epoch_times) == EPOCHS and all(seconds > 0 for _, seconds in epoch_times)
    assert run.metric("throughput/samples_per_sec") and all(v > 0 for _, v in run.metric("throughput/samples_per_sec"))
    assert not run.metric("memory/peak_gb")  # only on CUDA
    # The CSV log (what reports plot) holds the same values as W&B.
    csv_val = [v for _, v in _csv_column(tracked.run_dir / "metrics.csv", "val/loss")]
    assert csv_val == [row["val/loss"] for row in val]


def test_summary_holds_the_best_checkpoint_metrics(tracked: Tracked) -> None:
    run = tracked.wandb
    val = [row for row in run.history if "val/loss" in row]
    best_row = min(val, key=lambda row: row["val/loss"])
    summary = run.summary
    assert summary["best/val/loss"] == best_row["val/loss"]
    assert summary["best/val/acc"] == best_row["val/acc"]
    assert summary["best/epoch"] == best_row["epoch"]
    local = json.loads((tracked.run_dir / "summary.json").read_text())
    assert summary["best/checkpoint"] == local["best"]["checkpoint"]
    assert summary["best/step"] == int(local["best"]["checkpoint"].rsplit("-", 1)[-1].removesuffix(".ckpt"))
    assert "test/acc" in summary


def test_quiet_mode_prints_periodic_lines_without_a_progress_bar(tracked: Tracked) -> None:
    lines = tracked.stdout.splitlines()
    progress = [line for line in lines if f" step {EVERY}/{EPOCHS * BATCHES} " in line]
    assert len(progress) == 1 and "train/loss " in progress[0] and "lr " in progress[0]
    assert sum(" validation (step " in line for line in lines) == EPOCHS
    assert any("samples/s" in line for line in lines)
    assert "it/s" not in tracked.stdout and "\r" not in tracked.stdout  # no progress bar redraws in a log file


def test_report_is_written_at_the_end_and_plots_the_logged_values(tracked: Tracked) -> None:
    run_dir = tracked.run_dir
    report = (run_dir / "report.md").read_text()
    for name in ("loss", "metrics", "lr", "throughput"):
        png = run_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({name}.png)" in report
    charts = {chart.name: chart for chart in run_charts(read_run(run_dir))}
    curves = {curve.key: curve for curve in charts["loss"].panels[0].curves if curve.key}
    for key in ("train/loss", "val/loss", "test/loss"):
        logged = _csv_column(run_dir / "metrics.csv", key)
        assert list(zip(curves[key].x, curves[key].y, strict=True)) == logged
    assert "job 4242, array 4240_2, restarts 1" in report
    assert tracked.commit[:12] in report


def test_wandb_disabled_still_writes_csv_and_report(tmp_path: Path) -> None:
    (tmp_path / "disabled.yaml").write_text(LOGGERS.replace("log_model: true", "mode: disabled"))
    args = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "1")
    assert run_cli("fit", "--config", DIGITS, "--config", "disabled.yaml", *args, "--run.test_after_fit", "false") == 0
    (run_dir,) = run_dirs()
    assert not find_offline_runs(run_dir)
    assert len(_csv_column(run_dir / "metrics.csv", "val/loss")) == 1
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").is_file()


# ---------------------------------------------------------------------------------------------- no training
def test_progress_display_follows_the_terminal_and_yields_to_the_user() -> None:
    tty = progress_settings({}, interactive=True)
    assert tty["enable_progress_bar"] is True and isinstance(tty["callbacks"][-1], ProgressBar)
    batch = progress_settings({"callbacks": None}, interactive=False)
    assert batch["enable_progress_bar"] is False and isinstance(batch["callbacks"][-1], LineLogger)
    quiet = progress_settings({"enable_progress_bar": False}, interactive=True)
    assert quiet["enable_progress_bar"] is False and isinstance(quiet["callbacks"][-1], LineLogger)
    forced = progress_settings({"enable_progress_bar": True}, interactive=False)
    assert isinstance(forced["callbacks"][-1], ProgressBar)
    own = TQDMProgressBar()
    assert progress_settings({"callbacks": [own]}, interactive=True) == {}
    mine = LineLogger(every_n_steps=100)
    assert progress_settings({"callbacks": [mine]}, interactive=False)["callbacks"] == [mine]


def test_provenance_outside_git_and_outside_slurm(tmp_path: Path) -> None:
    assert git_info(tmp_path) == (None, "")
    assert job_info({}) is None
    assert job_info({"SLURM_JOB_ID": "9"}) == {"job_id": 9, "restart_count": 0}
    assert _without_credentials("https://user:token@github.com/a/b.git") == "https://github.com/a/b.git"
    assert _without_credentials("git@github.com:a/b.git") == "git@github.com:a/b.git"


def test_help_lists_the_report_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("--help") == 0
    assert "lightscale report RUN_DIR" in capsys.readouterr().out
    assert run_cli("report", "--help") == 0
    assert "comparison" in capsys.readouterr().out


class _FakeOnlineRun:
    """Stands in for an online ``wandb.Run`` (no network here): records what the logger uploads."""

    id = "fakeid01"
    name = "fake"

    def __init__(self) -> None:
        self.config: dict = {}
        self.summary: dict = {}
        self.artifacts: list[tuple[str, dict, list[str]]] = []

    def log(self, metrics: dict, **kwargs: object) -> None:
        pass

    def define_metric(self, *args: object, **kwargs: object) -> None:
        pass

    def log_artifact(self, artifact: object, aliases: list[str]) -> None:
        self.artifacts.append((artifact.name, dict(artifact.metadata), list(aliases)))  # type: ignore[attr-defined]


def test_online_mode_uploads_best_and_last_checkpoints_as_aliased_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from lightscale.callbacks import BestMetrics, Checkpoint
    from lightscale.loggers import WandbLogger

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))

    class Model(BoringModel):
        def validation_step(self, batch, batch_idx):
            loss = super().validation_step(batch, batch_idx)["x"]
            self.log("val/loss", loss)
            return loss

    logger = WandbLogger(mode="online", log_model=True, save_dir=str(tmp_path))
    logger._experiment = run = _FakeOnlineRun()
    checkpoint = Checkpoint(dirpath=tmp_path / "ckpt", monitor="val/loss", save_last=True, save_top_k=1)
    trainer = L.Trainer(
        max_epochs=3, limit_train_batches=2, limit_val_batches=2, logger=logger, callbacks=[checkpoint, BestMetrics()],
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(Model())
    # Uploaded once, at the end: the best checkpoint, then last.ckpt, as versions of one artifact; W&B moves the
    # "latest" alias to the newest version, so "best" and "latest" (= last.ckpt) end up on the two files.
    uploaded = [(meta["original_filename"], aliases) for _, meta, aliases in run.artifacts]
    assert uploaded == [(Path(checkpoint.best_model_path).name, ["latest", "best"]), ("last.ckpt", ["latest"])]
    assert {name for name, _, _ in run.artifacts} == {"model-fakeid01"}
    assert run.summary["best/val/loss"] == pytest.approx(float(checkpoint.best_model_score))


def test_runs_after_a_change_of_directory_still_write_their_wandb_file(tmp_path, monkeypatch):
    """wandb's service outlives a run and keeps its own working directory: relative run dirs must not reach it."""
    from lightscale.loggers import WandbLogger

    for index, step in enumerate(("first", "second")):
        work = tmp_path / step
        (work / "run").mkdir(parents=True)
        monkeypatch.chdir(work)
        logger = WandbLogger(project="lightscale-tests", save_dir="run", mode="offline")
        logger.log_metrics({"value": float(index)}, step=0)
        logger.experiment.finish()
        (offline,) = find_offline_runs(work / "run")
        assert read_offline_run(offline).history[0]["value"] == index
