"""GPU throughput: GPT-124M (GPT-2 small: 12 layers, 12 heads, 768 dims, context 1024, vocab 50304) trained by
CausalLM + Trainer in bf16 with compiled blocks; tokens/s, model FLOPs utilisation (MFU) against the device's
dense bf16 peak (ThroughputLogger's table: 989.5 TFLOP/s on an H100 SXM) and peak memory; then the same model
under DDP and under FSDP2 (ModelParallelStrategy) on one GPU. Each run's peak is set beside what
``lightscale preflight`` plans for it (``training.memory_plan``, on fake tensors), and its error.

Data are random tokens (benchmarks/synthetic.py): identical work to text, no corpus or tokenizer download.
Each configuration runs in its own process; the ThroughputLogger's whole-run average leaves out the first
logging interval (compilation, warm-up). Without a CUDA device the rows are printed as skipped.
``--smoke`` runs the same code path with a tiny model on the CPU (checks the harness, measures nothing).

    .venv/bin/python benchmarks/gpu.py [--steps 50] [--batch-size 12] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, finish, machine, quiet_env, row, skipped

HERE = Path(__file__).resolve().parent

BENCH = "gpu"
MFU_TARGET = 0.50
GPT_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304}
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 256}
STRATEGIES = ("single", "ddp", "fsdp")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process; returns its figures."""
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lightscale.models.causal_lm import CausalLM
    from lightscale.schedules import WarmupCosine
    from lightscale.tracking.throughput import ThroughputLogger
    from lightscale.training.memory_plan import plan_memory
    from lightscale.training.perf import enable_tf32
    from lightscale.training.strategy import ModelParallelStrategy
    from synthetic import RandomTokens

    shape = TINY if args.smoke else GPT_124M
    cuda = torch.cuda.is_available() and not args.smoke
    enable_tf32()
    data = RandomTokens(shape["vocab_size"], shape["block_size"], args.batch_size)

    def make_model() -> CausalLM:
        return CausalLM(
            **shape,
            dropout=0.0,
            bias=False,
            lr=6e-4,
            optimizer=partial(torch.optim.AdamW, betas=(0.9, 0.95), fused=cuda),
            scheduler=partial(WarmupCosine, total_steps=args.steps, warmup_steps=10, min_lr_ratio=0.1),
            compile=cuda,
            sample_prompt=None,
        )

    def make_strategy() -> Any:
        return {
            "single": "auto",
            "ddp": DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True),
            "fsdp": ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        }[args.worker]

    # what `lightscale preflight` predicts for this step, planned on fake tensors before the real run
    data.setup("fit")
    with torch.device("meta"):
        planned = make_model()
    batch = next(iter(data.train_dataloader()))
    plan = plan_memory(planned, batch, strategy=make_strategy(), devices=1, num_nodes=1, precision="bf16-mixed")
    model, strategy = make_model(), make_strategy()
    throughput = ThroughputLogger()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as root:
        trainer = L.Trainer(
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            strategy=strategy,
            precision="bf16-mixed",
            max_steps=args.steps,
            log_every_n_steps=args.every,
            gradient_clip_val=1.0,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[throughput],
            default_root_dir=root,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(model, data)
    summary = throughput.summary
    return {
        "strategy": args.worker,
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)",
        "params": model.net.num_params(),
        "tokens_per_sec": summary.get("throughput/tokens_per_sec"),
        "mfu": summary.get("throughput/mfu"),
        "peak_flops": throughput.available_flops,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "plan_peak_gb": plan.peak / 1e9,
        "steps": trainer.global_step,
    }


def run_worker(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", strategy, "--steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--every", str(args.every)] + (["--smoke"] if args.smoke else [])
    env = quiet_env({"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])})
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"{strategy} run failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def _plan_row(case: str, result: dict[str, Any]) -> dict[str, Any]:
    """Preflight's planned peak against the measured one (max_memory_allocated): the plan's error."""
    planned, measured = result["plan_peak_gb"], result["peak_gb"]
    if measured is None:  # smoke run on the CPU: nothing measured to compare with
        return row(BENCH, case, "preflight plan of the peak", planned, "GB", note="no GPU peak to compare")
    error = planned / measured - 1
    note = f"measured {measured:.2f} GB: {error:+.1%}"
    return row(BENCH, case, "preflight plan of the peak", planned, "GB", "within 25%", abs(error) <= 0.25, note)


def skipped_rows(reason: str) -> list[dict[str, Any]]:
    case = "GPT-124M bf16 + compile"
    return [
        skipped(BENCH, case, "throughput", reason),
        skipped(BENCH, case, "MFU (dense bf16 peak)", reason, target=f">= {MFU_TARGET:.0%} (H100)"),
        skipped(BENCH, case, "peak memory", reason),
        skipped(BENCH, case, "preflight plan of the peak", reason, target="within 25%"),
        skipped(BENCH, "GPT-124M DDP vs FSDP2, 1 GPU", "throughput, peak memory, preflight plan", reason),
    ]


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 50)")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--every", type=int, default=10, help="log_every_n_steps (the throughput interval)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code path only")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (8 if args.smoke or args.quick else 50)
    if args.smoke:
        args.every, args.batch_size = 2, 4
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        return finish(skipped_rows("skipped: no CUDA device"), args.json, {"machine": machine()})

    results = {strategy: run_worker(strategy, args) for strategy in STRATEGIES}
    single = results["single"]
    case = f"GPT-124M bf16 + compile, batch {args.batch_size}" if not args.smoke else "tiny GPT (smoke, CPU)"
    mfu = single["mfu"]
    rows = [
        row(BENCH, case, "throughput", single["tokens_per_sec"], "tokens/s", note=single["device"]),
        row(
            BENCH,
            case,
            "MFU (dense bf16 peak)",
            None if mfu is None else 100 * mfu,
            "%",
            f">= {MFU_TARGET:.0%} (H100)",
            None if mfu is None or args.smoke else mfu >= MFU_TARGET,
            f"peak {single['peak_flops'] / 1e12:.1f} TFLOP/s" if single["peak_flops"] else "peak unknown",
        ),
        row(BENCH, case, "peak memory", single["peak_gb"], "GB"),
        _plan_row(case, single),
    ]
    for strategy in ("ddp", "fsdp"):
        r = results[strategy]
        name = {"ddp": "DDP", "fsdp": "FSDP2"}[strategy]
        rows.append(row(BENCH, f"{case}, {name} on 1 GPU", "throughput", r["tokens_per_sec"], "tokens/s"))
        rows.append(row(BENCH, f"{case}, {name} on 1 GPU", "peak memory", r["peak_gb"], "GB"))
        rows.append(_plan_row(f"{case}, {name} on 1 GPU", r))
    return finish(rows, args.json, {"machine": machine(), "results": results})


if __name__ == "__main__":
    sys.exit(main())
