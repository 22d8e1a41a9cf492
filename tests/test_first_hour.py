"""The first hour of a new user: resume keeps the history, longer runs and predict work as expected, saved configs
re-run, launch mistakes and W&B trouble are one line, and the small things a user notices at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, REPO, python_cli, run_cli, run_dirs, without_logging_noise
from helpers.faults import Crash
from helpers.resume import metrics_history

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
GPT = str(CONFIGS / "experiment" / "gpt-cpu.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def error_line(stderr: str) -> str:
    lines = without_logging_noise(stderr)
    assert lines and lines[-1].startswith("lightscale: error: ") and not any("Traceback" in x for x in lines), lines
    assert sum(line.startswith("lightscale: error: ") for line in lines) == 1, lines
    return lines[-1]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


# ------------------------------------------------------------------------------------------- resume, history
def digits(*args: str) -> list[str]:
    return ["fit", "--config", DIGITS, "--config", CSV, "--trainer.max_epochs", "3", "--run.report", "false",
            "--checkpoint.last_every_n_steps", "4", *QUIET, *args]  # fmt: skip


def test_a_resumed_run_keeps_the_whole_history_of_the_uninterrupted_one() -> None:
    """Crash mid-epoch at step 15, resume from last.ckpt (step 12): metrics.csv, summary.json and the report's
    data are those of the run that was never interrupted, with nothing lost and nothing logged twice."""
    assert run_cli(*digits("--run.dir", "runs/reference")) == 0
    crash = ["--trainer.callbacks+=helpers.faults.CrashAt", "--trainer.callbacks.step=15"]
    with pytest.raises(Crash):
        run_cli(*digits("--run.dir", "runs/resumed", *crash))
    assert summary(Path("runs/resumed"))["status"] == "failed"
    assert run_cli(*digits("--run.dir", "runs/resumed", "--ckpt_path", "auto")) == 0

    reference, resumed = Path("runs/reference"), Path("runs/resumed")
    assert metrics_history(resumed) == metrics_history(reference)
    steps = [int(row["step"]) for row in metrics_history(resumed) if "train/loss" in row]
    assert steps == [9, 19, 29]  # every logged step (log_every_n_steps 10) once
    ref, res = summary(reference), summary(resumed)
    assert res["status"] == "finished" and (ref["starts"], res["starts"]) == (1, 2)
    assert res["train_samples"] == ref["train_samples"] and res["global_step"] == ref["global_step"] == 30
    assert res["fit_metrics"]["val/loss"] == ref["fit_metrics"]["val/loss"]


def test_a_resume_that_fails_leaves_the_history_as_it_was() -> None:
    assert run_cli(*digits("--run.dir", "runs/r", "--trainer.max_epochs", "2")) == 0
    before = (Path("runs/r") / "metrics.csv").read_text()
    assert run_cli(*digits("--run.dir", "runs/r", "--ckpt_path", "auto", "--trainer.max_epochs", "4")) == 2
    assert (Path("runs/r") / "metrics.csv").read_text() == before
    assert summary(Path("runs/r"))["status"] == "finished"  # a refused resume does not make the run "failed"


def test_training_longer_than_planned(capsys: pytest.CaptureFixture[str]) -> None:
    """OneCycle stores its length: extending is refused at start in one line. A warm-up + cosine schedule is
    computed from the run's length, so the same extension re-plans it and trains on."""
    assert run_cli(*digits("--run.dir", "runs/onecycle", "--trainer.max_epochs", "2")) == 0
    capsys.readouterr()
    assert run_cli(*digits("--run.dir", "runs/onecycle", "--ckpt_path", "auto", "--trainer.max_epochs", "4")) == 2
    assert "OneCycle was planned for 20 optimizer steps and cannot be extended to the 40" in error_line(
        capsys.readouterr().err
    )
    cosine = ["--model.scheduler", "lightscale.schedules.WarmupCosine", "--model.scheduler.warmup_steps", "2"]
    assert run_cli(*digits("--run.dir", "runs/cosine", "--trainer.max_epochs", "2", *cosine)) == 0
    assert (
        run_cli(*digits("--run.dir", "runs/cosine", "--ckpt_path", "auto", "--trainer.max_epochs", "4", *cosine)) == 0
    )
    assert summary(Path("runs/cosine"))["global_step"] == 40
    steps = [int(row["step"]) for row in metrics_history(Path("runs/cosine")) if "train/loss" in row]
    assert steps[-1] == 39 and len(steps) == len(set(steps))


def test_resuming_with_another_schedule_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*digits("--run.dir", "runs/s", "--trainer.max_epochs", "1")) == 0
    capsys.readouterr()
    cosine = ["--model.scheduler", "lightscale.schedules.WarmupCosine"]
    assert run_cli(*digits("--run.dir", "runs/s", "--ckpt_path", "auto", *cosine)) == 2
    error = error_line(capsys.readouterr().err)
    assert "its LR scheduler state does not fit this run's WarmupCosine" in error, error


# ------------------------------------------------------------------------------------------------- predict
def test_predict_on_a_fit_checkpoint_writes_every_prediction(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*digits("--trainer.max_epochs", "4", "--run.test_after_fit", "false")) == 0
    (fit_dir,) = run_dirs()
    best = next((fit_dir / "checkpoints").glob("best-*.ckpt"))
    capsys.readouterr()
    assert run_cli("predict", "--config", str(fit_dir / "config.yaml"), "--ckpt_path", str(best)) == 0
    (predict_dir,) = [p for p in run_dirs() if p != fit_dir]
    out = capsys.readouterr().err + capsys.readouterr().out
    rows = [json.loads(line) for line in (predict_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 270  # the digits test split
    assert sorted(row["index"] for row in rows) == list(range(270))
    assert all(0 <= row["label"] <= 9 and 0.1 <= row["probability"] <= 1 for row in rows)
    assert summary(predict_dir)["predict"] == {"file": "predictions.jsonl", "rows": 270}
    assert summary(predict_dir)["status"] == "finished"
    del out


def test_gpt_predict_prints_and_writes_the_continuations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def main(x):\n    import os\n    return x\n" * 200)
    tiny = ["--data.path", str(corpus), "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16",
            "--model.block_size", "32", "--data.block_size", "32", "--data.batch_size", "4", "--data.val_batches", "1",
            "--data.cache_dir", str(tmp_path / "tokens"), "--trainer.max_steps", "3", "--model.max_new_tokens", "5",
            "--trainer.val_check_interval", "3", *QUIET]  # fmt: skip
    assert run_cli("fit", "--config", GPT, *tiny) == 0
    (fit_dir,) = run_dirs()
    capsys.readouterr()
    prompts = ["def main(", "import "]
    args = ["--config", str(fit_dir / "config.yaml"), "--ckpt_path", str(fit_dir / "checkpoints" / "last.ckpt")]
    assert run_cli("predict", *args, "--data.prompts", json.dumps(prompts)) == 0
    printed = capsys.readouterr().out
    (predict_dir,) = [p for p in run_dirs() if p != fit_dir]
    texts = [json.loads(line)["text"] for line in (predict_dir / "predictions.jsonl").read_text().splitlines()]
    assert [t[: len(p)] for t, p in zip(texts, prompts, strict=True)] == prompts
    assert all(len(text.encode()) >= len(prompt) + 5 for text, prompt in zip(texts, prompts, strict=True))
    assert all(text in printed for text in texts)


# ---------------------------------------------------------------------------------------- saved configs re-run
def test_a_saved_config_with_an_appended_callback_re_runs() -> None:
    swa = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.StochasticWeightAveraging",
        "--trainer.callbacks.swa_lrs",
        "0.01",
        "--trainer.callbacks+=lightning.pytorch.callbacks.Timer",  # an enum default (interval=Interval.step)
    ]
    assert run_cli(*digits("--trainer.max_epochs", "2", *swa)) == 0
    (first,) = run_dirs()
    saved = yaml.safe_load((first / "config.yaml").read_text())
    swa_config = next(c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("StochasticWeightAveraging"))
    assert swa_config["init_args"]["device"] == "cpu"
    timer_config = next(c for c in saved["trainer"]["callbacks"] if c["class_path"].endswith("Timer"))
    assert timer_config["init_args"]["interval"] == "step"
    assert run_cli("fit", "--config", str(first / "config.yaml")) == 0
    (second,) = [p for p in run_dirs() if p != first]
    # 2 epochs of 10 steps, and SWA's extra one-batch epoch that updates the batch-norm statistics
    assert summary(second)["global_step"] == summary(first)["global_step"] == 21


# --------------------------------------------------------------------------------------------- launch mistakes
def test_torchrun_with_a_devices_mismatch_is_refused_at_start() -> None:
    env = {"TORCHELASTIC_RUN_ID": "test", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    result = python_cli("fit", "--config", DIGITS, env=env)
    assert result.returncode == 2
    assert error_line(result.stderr) == (
        "lightscale: error: torchrun started 2 processes, but trainer.devices x trainer.num_nodes = 1 x 1 = 1: pass "
        "--trainer.devices <processes per node> and --trainer.num_nodes <nodes>"
    )
    assert not Path("runs").exists()


@pytest.mark.slow
def test_torchrun_trains_with_matching_devices() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lightscale",
         "fit", "--config", DIGITS, "--config", CSV, "--trainer.devices", "2", "--trainer.accelerator", "cpu",
         "--trainer.max_epochs", "1", "--run.report", "false", *QUIET],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LIGHTSCALE_RUN_DIR")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs()
    assert summary(run_dir)["world_size"] == 2 and summary(run_dir)["status"] == "finished"


# ----------------------------------------------------------------------------------------------------- W&B
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "W&B online mode needs an API key for"),
        ({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "https://api.wandb.invalid"}, "W&B online mode cannot reach"),
    ],
    ids=["no key", "no network"],
)
def test_wandb_online_trouble_is_one_line_and_leaves_no_run(env: dict, named: str, tmp_path: Path) -> None:
    env = {**env, "NETRC": str(tmp_path / "no-netrc")}
    result = python_cli("fit", "--config", DIGITS, "--config", str(CONFIGS / "logger" / "wandb-online.yaml"), env=env)
    assert result.returncode == 2
    assert named in error_line(result.stderr)
    assert not Path("runs").exists()


def test_report_picks_the_newest_run_that_has_results() -> None:
    assert run_cli(*digits("--trainer.max_epochs", "1")) == 0
    (finished,) = run_dirs()
    newer = Path("runs/digits/29991231-000000-abcdef")  # a run that never got to write anything
    newer.mkdir(parents=True)
    (newer / "config.yaml").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "lightscale.report"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(finished / "report.md") in result.stdout and (finished / "report.md").is_file()


# ----------------------------------------------------------------------------------------- config file errors
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("trainer:\n  max_epochs: 3\n  devices: [1\n", "bad.yaml:4:1: YAML syntax error: expected ',' or ']'"),
        ("trainer: max_epochs: 3\n", "bad.yaml:1:20: YAML syntax error: mapping values are not allowed here"),
        ("trainer:\n  max_epocs: 3\n", "does not accept option 'trainer.max_epocs' (set in bad.yaml:2)"),
        (
            "model:\n  init_args:\n    lr: -1\n",
            "model.lr: Not of type PositiveFloat: -1 does not conform to restriction v>0 (set in bad.yaml:3)",
        ),
    ],
    ids=["unclosed list", "mapping in a value", "unknown key", "bad value"],
)
def test_a_config_file_mistake_names_the_file_and_line(
    text: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    Path("bad.yaml").write_text(text)
    assert run_cli("fit", "--config", DIGITS, "--config", CSV, "--config", "bad.yaml") == 2
    error = error_line(capsys.readouterr().err)
    assert expected in error, error
    assert not Path("runs").exists()


def test_a_bad_command_line_value_is_not_blamed_on_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("fit", "--config", DIGITS, "--model.lr", "-1") == 2
    assert error_line(capsys.readouterr().err).endswith("does not conform to restriction v>0")


# ----------------------------------------------------------------------------------- models without a test_step
def test_test_after_fit_only_tests_what_can_be_tested() -> None:
    args = ["fit", "--model", "external_models.LineFitShowingProgress", "--data", "external_models.LineDataWithTest",
            "--trainer.max_epochs", "2", "--checkpoint.monitor", "val_mse", "--config", CSV, *QUIET]  # fmt: skip
    assert run_cli(*args) == 0
    (run_dir,) = run_dirs()
    result = summary(run_dir)
    assert result["status"] == "finished" and "test_metrics" not in result


def test_the_progress_lines_show_what_the_model_logs_for_them(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--model", "external_models.LineFitShowingProgress", "--data", "external_models.LineData",
            "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "4", "--config", CSV, *QUIET]  # fmt: skip
    assert run_cli(*args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " step " in line and "my/slope" in line]
    assert len(lines) == 4  # 16 steps, a line every 4


# ------------------------------------------------------------------------------------------- smaller things
def test_version_and_help_list_the_commands() -> None:
    version = python_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == "lightscale 0.1.0"
    help_text = python_cli("--help")
    assert help_text.returncode == 0
    for command in ("fit", "validate", "test", "predict", "report", "preflight", "sync"):
        assert command in help_text.stdout, command


def test_submit_help_shows_only_the_usage() -> None:
    result = subprocess.run(["bash", str(REPO / "slurm" / "submit.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "slurm/submit.sh [sbatch options] CONFIG" in result.stderr and "set -euo" not in result.stderr


def test_a_run_starts_without_dependency_chatter_and_ends_without_false_warnings() -> None:
    """No litlogger tip, no W&B 'anonymous' warning, no CSV 'will be deleted' warning, and no 'val/loss is not
    logged' for a run that simply stopped before its first validation (digits validates at each epoch end)."""
    result = python_cli("fit", "--config", DIGITS, "--trainer.max_steps", "3", *QUIET)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    for noise in ("litlogger", "anonymous", "will be deleted", "is not logged by this model", "Warning"):
        assert noise not in output, noise


def test_the_early_stopping_monitor_is_one_key() -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    from lightscale.cli import LightscaleCLI

    def stoppers(*args: str) -> list[EarlyStopping]:
        cli = LightscaleCLI(args=["--config", DIGITS, *args], run=False)
        return [c for c in cli.trainer.callbacks if isinstance(c, EarlyStopping)]

    (default,) = stoppers()
    assert (default.monitor, default.patience) == ("val/loss", 8)
    (changed,) = stoppers("--early_stopping.monitor", "val/acc", "--early_stopping.mode", "max")
    assert (changed.monitor, changed.mode) == ("val/acc", "max")
    assert stoppers("--early_stopping", "null") == []
    Path("off.yaml").write_text("early_stopping: null\n")
    assert stoppers("--config", "off.yaml") == []


def test_bf16_with_a_fused_optimizer_clips_gradients() -> None:
    """Lightning refuses to clip gradients for fused optimizers under any mixed precision; bf16 has no loss scale,
    so the template clips them (to the configured norm) instead of crashing."""
    import lightning as L

    from lightscale.training.precision import UnscaledMixedPrecision

    class Big(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).sum() * 1e6

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            self.norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()]))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), fused=True)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4)

    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", gradient_clip_val=0.5, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    from lightscale.training.precision import install_unscaled_mixed_precision

    install_unscaled_mixed_precision(trainer)
    assert isinstance(trainer.precision_plugin, UnscaledMixedPrecision)
    model = Big()
    trainer.fit(model)
    assert float(model.norm) == pytest.approx(0.5, rel=1e-3)
