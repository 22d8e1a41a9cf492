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


def fit(root: str, devices: int, steps: int, every: int, accelerator: str, extra: tuple[str, ...] = ()) -> dict:
    """Run ``lightscale fit`` and return the run's summary.json."""
    name = f"{accelerator}{devices}{'-variant' if extra else ''}"
    command = [
        sys.executable, "-m", "lightscale", "fit", "--config", CONFIG,
        "--run.root", root, "--run.name", name, "--run.test_after_fit", "false", "--run.report", "false",
        "--trainer.accelerator", accelerator, "--trainer.devices", str(devices),
        "--trainer.max_steps", str(steps), "--trainer.log_every_n_steps", str(every),
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--model.sample_prompt", "null", *extra,
    ]  # fmt: skip
    if devices > 1:
        command += ["--trainer.strategy", "ddp"]
    result = subprocess.run(command, capture_output=True, text=True, env=quiet_env({"OMP_NUM_THREADS": "1"}), cwd=root)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    (summary,) = Path(root, name).glob("*/summary.json")
    return json.loads(summary.read_text())


def _plain_worker(rank: int, world: int, steps: int, port: int, out: str) -> None:
    """One process of the plain loop: torch DDP over gloo, the tiny GPT's sizes, random tokens, no Lightning."""
    import os
    import time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lightscale.nets.gpt import GPT, GPTConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    net = DistributedDataParallel(GPT(GPTConfig(256, 128, 4, 4, 128, 0.0, False)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    batch = torch.randint(0, 256, (12, 129))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        _, loss = net(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    warm = sorted(times[steps // 6 :])
    if rank == 0:
        Path(out).write_text(str(world * 12 * 128 / warm[len(warm) // 2]))
    dist.destroy_process_group()


def plain_tokens_per_sec(devices: int, steps: int) -> float:
    """tokens/s of the plain loop in ``devices`` processes (each its own thread), median step."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock, tempfile.TemporaryDirectory() as tmp:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        out = str(Path(tmp) / "tokens_per_sec")
        mp.spawn(_plain_worker, args=(devices, steps, port, out), nprocs=devices)
        return float(Path(out).read_text())


def tokens_per_sec(summary: dict) -> float:
    return float(summary["fit_metrics"]["throughput/tokens_per_sec"])


def measure(accelerator: str, devices: int, steps: int, every: int, extra: tuple[str, ...] = ()) -> list[dict]:
    label = f"tiny GPT, {accelerator.upper()}" + (", CSV logger only (no W&B service)" if extra else "")
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as root:
        one = tokens_per_sec(fit(root, 1, steps, every, accelerator, extra))
        many = tokens_per_sec(fit(root, devices, steps, every, accelerator, extra))
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
    # Machine or code? The same two measurements without the W&B service process (a third process on two
    # cores), and for a plain torch DDP loop with no Lightning at all.
    rows += measure("cpu", 2, steps, every, ("--trainer.logger", "[{class_path: lightscale.loggers.CSVLogger}]"))
    one, two = plain_tokens_per_sec(1, steps), plain_tokens_per_sec(2, steps)
    print(f"  plain torch DDP: 1 process {one:,.0f} tokens/s, 2 processes {two:,.0f} tokens/s -> {two / (2 * one):.0%}")
    label = "tiny GPT, CPU, plain torch DDP loop"
    rows += [
        row(BENCH, label, "1 process", one, "tokens/s", note=f"random tokens, {steps} steps, median step"),
        row(BENCH, label, "2 processes (DDP)", two, "tokens/s"),
        row(BENCH, label, "weak-scaling efficiency", 100 * two / (2 * one), "%", note="the machine's own ceiling"),
    ]
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
