"""Scaling on one box: the tiny GPT (configs/experiment/gpt-cpu.yaml) trained by ``lightscale fit`` in 1 process
and in 2 DDP processes, same per-process batch (weak scaling), tokens/s from the run's ThroughputLogger.

Weak-scaling efficiency = tokens/s with N processes / (N x tokens/s with 1). Every process gets one torch
thread (``OMP_NUM_THREADS=1``, what Lightning's CPU DDP uses anyway), so the 1-process baseline is one core
and 2 processes use both cores of a 2-core machine. Validation is off (``limit_val_batches 0``) so only
training is timed; ThroughputLogger leaves out the first logging interval (start-up, warm-up). On a machine
with >= 2 CUDA devices the same runs are repeated on the GPUs.

    .venv/bin/python benchmarks/scaling.py [--steps 60] [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, base_parser, finish, machine, quiet_env, row, skipped

BENCH = "scaling"
CONFIG = str(REPO / "configs" / "experiment" / "gpt-cpu.yaml")


def fit(root: str, devices: int, steps: int, every: int, accelerator: str) -> dict:
    """Run ``lightscale fit`` and return the run's summary.json."""
    name = f"{accelerator}{devices}"
    command = [
        sys.executable, "-m", "lightscale", "fit", "--config", CONFIG,
        "--run.root", root, "--run.name", name, "--run.test_after_fit", "false", "--run.report", "false",
        "--trainer.accelerator", accelerator, "--trainer.devices", str(devices),
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(every),
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--model.sample_prompt", "null",
    ]  # fmt: skip
    if devices > 1:
        command += ["--trainer.strategy", "ddp"]
    result = subprocess.run(command, capture_output=True, text=True, env=quiet_env({"OMP_NUM_THREADS": "1"}), cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (summary,) = Path(root, name).glob("*/summary.json")
    return json.loads(summary.read_text())


def tokens_per_sec(summary: dict) -> float:
    return float(summary["fit_metrics"]["throughput/tokens_per_sec"])


def measure(accelerator: str, devices: int, steps: int, every: int) -> list[dict]:
    label = f"tiny GPT, {accelerator.upper()}"
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as root:
        one = tokens_per_sec(fit(root, 1, steps, every, accelerator))
        many = tokens_per_sec(fit(root, devices, steps, every, accelerator))
    efficiency = many / (devices * one)
    unit = "thread" if accelerator == "cpu" else "GPU"
    print(f"  {label}: 1 process {one:,.0f} tokens/s, {devices} processes {many:,.0f} tokens/s -> {efficiency:.0%}")
    return [
        row(BENCH, label, "1 process", one, "tokens/s", note=f"1 {unit}, {steps} steps"),
        row(BENCH, label, f"{devices} processes (DDP)", many, "tokens/s", note=f"1 {unit} each, same batch each"),
        row(
            BENCH, label, "weak-scaling efficiency", 100 * efficiency, "%", note=f"{devices}-process / ({devices} x 1)"
        ),
    ]


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 60; quick: 6)")
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 60)
    every = 2 if args.quick else 10
    rows = measure("cpu", 2, steps, every)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= 2:
        rows += measure("gpu", min(gpus, 8), steps, every)
    else:
        reason = "skipped: no CUDA device" if gpus == 0 else "skipped: needs 2 CUDA devices, found 1"
        rows.append(skipped(BENCH, "tiny GPT, GPU", "weak-scaling efficiency", reason))
    return finish(rows, args.json, {"machine": machine()})


if __name__ == "__main__":
    sys.exit(main())
