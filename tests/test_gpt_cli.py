"""The GPT example end to end: through the ``lightscale`` CLI, and on 2 CPU processes with DDP and FSDP2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, python_cli, run_cli, run_dirs

SCRIPT = Path(__file__).parent / "scripts" / "gpt_distributed.py"
GPT_CPU = str(CONFIGS / "experiment" / "gpt-cpu.yaml")
POEM = (
    "Tyger Tyger, burning bright,\nIn the forests of the night;\nWhat immortal hand or eye,\n"
    "Could frame thy fearful symmetry?\n"
)
# a few seconds of training: small corpus slice, few steps, short samples
TINY = [
    "--config", GPT_CPU,
    "--config", str(CONFIGS / "logger" / "csv.yaml"),
    "--data.max_bytes", "200000",
    "--data.train_samples_per_epoch", "360",
    "--data.block_size", "64",
    "--model.block_size", "64",
    "--model.scheduler.warmup_steps", "10",
    "--trainer.max_steps", "30",
    "--trainer.val_check_interval", "15",
    "--model.max_new_tokens", "16",
]  # fmt: skip


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_gpt_cpu_experiment_trains_through_the_cli(tmp_path: Path) -> None:
    assert run_cli("fit", *TINY, "--data.cache_dir", str(tmp_path / "tokens")) == 0
    (run_dir,) = run_dirs()
    assert run_dir.parent.name == "gpt-cpu"
    result = summary(run_dir)
    metrics = result["fit_metrics"]
    assert result["global_step"] == 30
    assert metrics["val/loss"] < 4.5  # from ln(256) = 5.55 at init: it learns
    assert metrics["throughput/tokens_per_sec"] > 0 and "throughput/mfu" not in metrics  # CPU: no MFU
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "throughput/tokens_per_sec"} <= set(header)
    assert any(column.startswith("lr-AdamW") for column in header)  # one per parameter group
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["vocab_size"] == 256  # linked from the data by the CLI


def test_compile_preset_switches_compilation_on(tmp_path: Path) -> None:
    from lightscale.cli import LightscaleCLI

    cli = LightscaleCLI(
        args=["--config", GPT_CPU, "--config", str(CONFIGS / "trainer" / "compile.yaml"),
              "--data.cache_dir", str(tmp_path / "tokens")],
        run=False,
    )  # fmt: skip
    assert cli.model.hparams.compile is True and cli.model.hparams.n_layer == 4


def _clean_env() -> dict[str, str]:
    """No leftovers from an earlier DDP launch in this process."""
    leaked = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "LIGHTSCALE_RUN_DIR")
    return {k: v for k, v in os.environ.items() if k not in leaked}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """The same tiny training on 2 CPU processes with DDP and with FSDP2 (each rank's record)."""
    out = tmp_path_factory.mktemp("distributed")
    corpus = out / "poem.txt"
    corpus.write_text(POEM * 40)
    runs = {}
    for strategy in ("ddp", "fsdp"):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), strategy, str(out), str(corpus)],
            capture_output=True,
            text=True,
            timeout=400,
            env=_clean_env(),
        )
        assert result.returncode == 0, result.stderr[-4000:]
        runs[strategy] = [torch.load(out / f"{strategy}-rank{r}.pt", weights_only=False) for r in (0, 1)]
    return runs


@pytest.mark.slow
def test_ddp_ranks_see_different_windows_and_end_with_identical_weights(distributed_runs: dict) -> None:
    rank0, rank1 = distributed_runs["ddp"]
    assert rank0["world_size"] == 2
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"])
    for key, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][key]), key
    assert any(not torch.equal(rank0["initial"][k], v) for k, v in rank0["final"].items())  # it trained


@pytest.mark.slow
def test_fsdp2_trains_the_same_model_as_ddp(distributed_runs: dict) -> None:
    ddp, fsdp = distributed_runs["ddp"], distributed_runs["fsdp"]
    for rank in (0, 1):
        assert torch.equal(fsdp[rank]["first_batch"], ddp[rank]["first_batch"])
    assert fsdp[0]["final"].keys() == ddp[0]["final"].keys()
    for key, value in ddp[0]["final"].items():
        torch.testing.assert_close(fsdp[0]["final"][key], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(fsdp[1]["final"][key], fsdp[0]["final"][key]), key  # gathered shards agree
    assert fsdp[0]["val_loss"] == pytest.approx(ddp[0]["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_ddp_preset_through_the_cli(tmp_path: Path) -> None:
    result = python_cli(
        "fit", *TINY, "--config", str(CONFIGS / "trainer" / "ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--data.cache_dir", str(tmp_path / "tokens"),
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = run_dirs()
    result = summary(run_dir)
    assert result["world_size"] == 2 and result["global_step"] == 30
    assert result["fit_metrics"]["val/loss"] < 4.5


@pytest.mark.slow
def test_fsdp_preset_through_the_cli_saves_and_resumes_sharded(tmp_path: Path) -> None:
    common = [
        *TINY, "--config", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
        "--data.cache_dir", str(tmp_path / "tokens"),
    ]  # fmt: skip
    first = python_cli("fit", *common, timeout=400)
    assert first.returncode == 0, first.stderr[-4000:]
    (run_dir,) = run_dirs()
    assert (run_dir / "checkpoints" / "last.ckpt").is_dir()  # one shard file per rank
    assert summary(run_dir)["global_step"] == 30

    resumed = python_cli(
        "fit", *common, "--trainer.max_steps", "45", "--run.dir", str(run_dir),
        "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), timeout=400,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert summary(run_dir)["global_step"] == 45


@pytest.mark.slow
def test_predict_on_more_processes_than_prompts_is_one_line(tmp_path: Path) -> None:
    """Lightning cannot give a process no sample (it asserts deep in its sampler wrapper): refused at once."""
    result = python_cli(
        "predict", *TINY, "--config", str(CONFIGS / "trainer" / "ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.prompts", '["def "]',
        "--data.cache_dir", str(tmp_path / "tokens"), timeout=400,
    )  # fmt: skip
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("lightscale: error:")]
    assert errors and all("data.prompts: 1 prompt(s) for 2 processes" in line for line in errors), result.stderr
    assert "Traceback" not in result.stderr and not run_dirs()
