"""``lightscale preflight``: parse, resources vs trainer, meta-device model, one CPU step; one line on error."""

from __future__ import annotations

from pathlib import Path

import pytest
from jsonargparse import Namespace

from conftest import CONFIGS, REPO, run_cli
from lightscale.cli.preflight import split_args
from lightscale.cluster.resources import (
    Resources,
    check_launch,
    gpu_count,
    gres_gpu_count,
    resolve_resources,
    sbatch_options,
    state_bytes_per_param,
    tasks_per_node,
)
from lightscale.core.errors import UserError

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CPU = str(CONFIGS / "trainer" / "cpu.yaml")
TRAIN = str(REPO / "slurm" / "train.sbatch")
SWEEP = str(REPO / "slurm" / "sweep.sbatch")


def preflight(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli("preflight", *args)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------- resources
def test_tasks_per_node() -> None:
    assert tasks_per_node({"SLURM_NTASKS_PER_NODE": "4"}) == 4
    assert tasks_per_node({"SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2"}) == 4
    with pytest.raises(UserError):
        tasks_per_node({"SLURM_NTASKS": "3", "SLURM_JOB_NUM_NODES": "2"})


def test_gpu_specs() -> None:
    assert [gpu_count(s) for s in ("4", "a100:4", "0", None)] == [4, 4, 0, None]
    assert [gres_gpu_count(s) for s in ("gpu:4", "gpu:a100:2", "gpu", "nvme:1", "gpu:8,nvme:1")] == [4, 2, 1, 0, 8]
    with pytest.raises(UserError):
        gpu_count("lots")


def test_reads_the_shipped_sbatch_headers() -> None:
    train = sbatch_options(TRAIN)
    assert train["--nodes"] == "1" and train["--ntasks-per-node"] == "4" and train["--gpus-per-node"] == "4"
    assert train["--signal"] == "SIGUSR1@90" and "--requeue" in train and train["--open-mode"] == "append"
    assert "--partition" not in train  # "##SBATCH" lines are comments
    assert resolve_resources(train) == Resources(nodes=1, tasks_per_node=4, gpus_per_node=4)
    sweep = sbatch_options(SWEEP)
    assert (sweep["--ntasks-per-node"], sweep["--gpus-per-node"]) == ("1", "1")


def test_header_stops_at_first_command(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n# a comment\n#SBATCH -N 2 --ntasks=8\n\necho hi\n#SBATCH --nodes=9\n")
    options = sbatch_options(script)
    assert options["--nodes"] == "2" and options["--ntasks"] == "8"
    assert resolve_resources(options) == Resources(nodes=2, tasks_per_node=4, gpus_per_node=None)
    with pytest.raises(UserError, match="does not split evenly"):
        resolve_resources({"--nodes": "3", "--ntasks": "8"})


def test_allocation_environment() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_GPUS_PER_NODE": "h100:4",
    }
    assert resolve_resources({}, env) == Resources(2, 4, 4, "SLURM job 7")


def test_split_args_keeps_fit_arguments_in_order() -> None:
    options, rest = split_args(["fit", "--nodes=2", "--config", "a.yaml", "--no-step", "--sbatch", "s", "--x", "1"])
    assert options == {"--nodes": "2", "--no-step": "1", "--sbatch": "s"}
    assert rest == ["--config", "a.yaml", "--x", "1"]


# ---------------------------------------------------------------------------------------- launch checks
def trainer(**values: object) -> Namespace:
    return Namespace(**{"accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto", **values})


@pytest.mark.parametrize(
    ("settings", "resources", "message"),
    [
        ({}, Resources(1, 2, 4), "set --ntasks-per-node=4"),
        ({"devices": 4, "accelerator": "gpu"}, Resources(1, 2, 2), "trainer.devices=4"),
        ({"devices": 2, "accelerator": "cpu"}, Resources(1, 1, 0), "--ntasks-per-node=1"),
        ({"devices": 2, "num_nodes": 1, "accelerator": "gpu"}, Resources(2, 2, 2), "trainer.num_nodes=1"),
        ({"accelerator": "gpu", "devices": 1}, Resources(1, 1, 0), "requests no GPUs"),
        ({"accelerator": "cpu"}, Resources(1, 2, 0), "trainer.devices=auto"),  # auto on CPU is one process
        (
            {
                "devices": 4,
                "accelerator": "gpu",
                "strategy": Namespace(
                    class_path="lightning.pytorch.strategies.ModelParallelStrategy",
                    init_args=Namespace(data_parallel_size=2, tensor_parallel_size=1),
                ),
            },
            Resources(1, 4, 4),
            "data_parallel_size=2",
        ),
    ],
    ids=["tasks-vs-gpus", "devices-vs-tasks", "cpu-devices-vs-tasks", "nodes", "gpu-without-gpus", "cpu-auto", "fsdp"],
)
def test_launch_mismatches_are_errors(settings: dict, resources: Resources, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        check_launch(trainer(**settings), resources)


def test_consistent_launch_passes() -> None:
    assert check_launch(trainer(devices=4, num_nodes=2, accelerator="gpu"), Resources(2, 4, 4)) == []
    assert check_launch(trainer(devices="auto", num_nodes=2), Resources(2, 4, 4)) == []  # auto = all 4 GPUs
    warnings = check_launch(trainer(devices=2, accelerator="cpu"), Resources(1, 2, 2))
    assert warnings and "trains on the CPU" in warnings[0]


def test_state_bytes() -> None:
    assert state_bytes_per_param("bf16-mixed") == 16 and state_bytes_per_param(None) == 16
    assert state_bytes_per_param("bf16-true") == 8


# ------------------------------------------------------------------------------------------ end to end
def test_preflight_ok_runs_one_cpu_step(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = preflight(
        capsys, "--sbatch", TRAIN, "--from-slurm", "--ntasks-per-node=2", "--gpus-per-node=0", "--config", DIGITS,
        "--config", CPU,
    )  # fmt: skip
    assert code == 0, err
    assert "params     65.8 K (65.8 K trainable)" in out
    assert "1 node(s) x 2 task(s) x 0 GPU(s)" in out and "devices=2 num_nodes=1" in out and "world size 2" in out
    assert "one training + one validation batch on the CPU: ok" in out and out.rstrip().endswith("preflight ok")
    assert not (tmp_path / "runs").exists()  # nothing written into a run


@pytest.mark.parametrize(
    ("options", "overrides", "message"),
    [
        (["--sbatch", TRAIN, "--from-slurm", "--ntasks-per-node=2"], [], "Lightning runs one task per GPU"),
        (["--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0"], ["--trainer.devices", "3"], "devices=3"),
        ([], ["--trainer.max_epochz", "2"], "unrecognized arguments: --trainer.max_epochz"),
        ([], ["--model.init_args.lr", "-1"], "model.lr: Not of type PositiveFloat"),
        ([], ["--data.init_args.val_fraction", "0.6", "--data.init_args.test_fraction", "0.6"], "must be < 1"),
    ],
    ids=["tasks-vs-gpus", "devices-vs-tasks", "bad-key", "bad-value", "data-init-error"],
)
def test_preflight_first_error_is_one_line(
    capsys: pytest.CaptureFixture[str], options: list[str], overrides: list[str], message: str
) -> None:
    code, out, err = preflight(capsys, "--no-step", *options, "--config", DIGITS, "--config", CPU, *overrides)
    assert code == 2, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lightscale preflight: error:"), err
    assert message in lines[0]
    assert "preflight ok" not in out


def test_big_model_on_meta_device(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """GPT-2-sized model: built on the meta device (no memory), counted, memory estimated, no CPU step."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    code, out, err = preflight(
        capsys, "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--gpu-mem-gb", "1",
        "--config", str(CONFIGS / "experiment" / "gpt2-124m.yaml"), "--data.path", str(corpus),
        "--data.tokenizer", "byte", "--data.val_fraction", "0.5", "--data.num_workers", "0",
        "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.accelerator", "gpu", "--trainer.devices", "4", "--trainer.num_nodes", "2",
    )  # fmt: skip
    assert code == 0, err
    params_line = next(line for line in out.splitlines() if "params" in line)
    params = float(params_line.split()[1]) * 1e6
    assert 80e6 < params < 90e6  # 12 x 768 GPT with a byte vocabulary
    assert "world size 8" in out and "FSDP over 8" in out
    ddp_gb = float(out.split("DDP ")[1].split(" GB")[0])
    assert ddp_gb == pytest.approx(16 * params / 1e9, abs=0.01)
    assert "no CPU step" in out and "one training batch: [" in out
    assert "warning    the DDP training state" in out  # 1.4 GB does not fit the 1 GB GPUs given
