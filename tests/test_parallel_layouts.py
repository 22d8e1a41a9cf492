"""The parallel layouts train the same model as one process: a tiny GPT, same seed, same data, a few AdamW steps
(dropout 0, fp32), run through the real CLI as separate processes (gloo, one thread each) under tensor parallelism
(TP=2), FSDP2 x TP (2 x 2) and HSDP (2 "nodes" x 2, replicate x shard), and compared with one process on:

- the loss of every step: one process logs it to metrics.csv; under data parallelism each rank logs its own share,
  so the probe callback records every rank's loss and the test averages them (equal shares: the global mean);
- the final weights, gathered whole from their DTensor shards (``full_tensor``) by the probe.

Every layout sees the same global batch of 16 windows per step: an epoch is exactly one step
(``train_samples_per_epoch`` = 16), so the ``WindowSampler`` hands data-parallel rank r of W the windows that one
process reads as rows r*16/W.. of its batch. ``gradient_clip_val`` is small enough that clipping acts on every
step, so the clip over parameters on two meshes (TP blocks on (data_parallel, tensor_parallel), embeddings and
norms on data_parallel) is part of what matches.

Tolerance (measured, see the constants): TP and FSDP2 change only the order of floating-point sums (row-wise
matmuls all-reduce partial sums; gradients are reduce-scattered), so fp32 results agree to rounding, amplified a
little by AdamW's normalised first steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, free_port, launcher_env, run_together

pytestmark = pytest.mark.slow

GLOBAL_BATCH, STEPS = 16, 4
LOSS_RTOL = 1e-6  # relative, per step; measured <= 1.9e-7 (torch 2.13, CPU)
# absolute, per element; measured <= 7.5e-7, while training moves weights by up to 2.6e-3 (initial N(0, 0.02))
WEIGHT_ATOL = 5e-6
EXPERIMENT = str(CONFIGS / "experiment" / "gpt-cpu.yaml")


def fit_args(workdir: Path, data_parallel: int) -> list[str]:
    """``fit`` of the experiment, sized down (:func:`sizing`)."""
    return ["fit", "--config", EXPERIMENT, *sizing(workdir, data_parallel)]


def sizing(workdir: Path, data_parallel: int) -> list[str]:
    """Overrides that size the experiment down, with a per-rank batch that makes the global batch GLOBAL_BATCH,
    and the probe that records losses and gathered weights (also used by test_slurm_jobs.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.txt"
    if not corpus.exists():
        corpus.write_text((Path(os.__file__).parent / "textwrap.py").read_text())
    config = {
        "trainer": {"max_steps": STEPS, "log_every_n_steps": 1, "limit_val_batches": 0, "gradient_clip_val": 0.1,
                    "enable_progress_bar": False, "precision": "32-true"},
        "model": {"init_args": {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "dropout": 0.0,
                                "compile": False, "sample_prompt": None,
                                "scheduler": {"init_args": {"warmup_steps": 1}}}},
        "data": {"init_args": {"path": str(corpus), "tokenizer": "byte", "block_size": 32, "num_workers": 0,
                               "batch_size": GLOBAL_BATCH // data_parallel, "train_samples_per_epoch": GLOBAL_BATCH,
                               "val_batches": 2, "val_fraction": 0.1, "cache_dir": str(workdir / "tokens")}},
        "run": {"report": False, "test_after_fit": False},
    }  # fmt: skip
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    probe = ["--trainer.callbacks+=helpers.probe.Probe", "--trainer.callbacks.losses", "true"]
    return ["--config", str(path), *probe]


def results(
    workdir: Path, world_size: int, meshes: dict[str, tuple[str, ...]] | None = None
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Per-step global loss (mean of the ranks' own losses) and rank 0's gathered final weights; every rank must
    have gathered the same weights. ``meshes``: parameter -> the mesh dims it must have been sharded over."""
    (run_dir,) = [p for p in (workdir / "runs").glob("*/*") if p.is_dir()]
    probe = run_dir / "probe"
    per_rank = [
        [float(line.split()[1]) for line in (probe / f"loss-rank{r}.txt").read_text().splitlines()]
        for r in range(world_size)
    ]
    assert all(len(losses) == STEPS for losses in per_rank), per_rank
    losses = [sum(step) / world_size for step in zip(*per_rank, strict=True)]
    weights = [torch.load(probe / f"weights-rank{r}.pt", weights_only=True) for r in range(world_size)]
    assert {w["global_step"] for w in weights} == {STEPS} and {w["world_size"] for w in weights} == {world_size}
    for other in weights[1:]:
        for name, tensor in weights[0]["weights"].items():
            assert torch.equal(tensor, other["weights"][name]), name
    for name, dims in (meshes or {}).items():
        assert weights[0]["meshes"][name] == dims, (name, weights[0]["meshes"])
    return losses, weights[0]["weights"]


def metrics_losses(workdir: Path) -> list[float]:
    """train/loss per step from the run's metrics.csv (rank 0's loss: the global loss when data_parallel is 1)."""
    import csv

    (path,) = (workdir / "runs").glob("*/*/metrics.csv")
    rows = list(csv.DictReader(path.open()))
    return [float(row["train/loss"]) for row in rows if row.get("train/loss")]


def compare(name: str, reference: tuple[list[float], dict], other: tuple[list[float], dict]) -> None:
    (ref_losses, ref_weights), (losses, weights) = reference, other
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(ref_losses, losses, strict=True))
    assert weights.keys() == ref_weights.keys()
    weight_diff = max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights)
    moved = max((ref_weights[k] - w).abs().max().item() for k, w in initial_weights().items())
    print(f"{name}: max relative loss difference {loss_diff:.2e}, max weight difference {weight_diff:.2e} "
          f"(weights moved up to {moved:.2e})")  # fmt: skip
    assert loss_diff <= LOSS_RTOL, (name, ref_losses, losses)
    assert weight_diff <= WEIGHT_ATOL, name


def initial_weights() -> dict[str, torch.Tensor]:
    """The model as the runs build it before training (same seed), to show the comparison is not vacuous."""
    from lightning import seed_everything

    from lightscale.models.causal_lm import CausalLM

    seed_everything(42, verbose=False)
    model = CausalLM(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=32)
    return {name: p.detach() for name, p in model.net.named_parameters()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[float], dict[str, torch.Tensor]]:
    workdir = tmp_path_factory.mktemp("one")
    run_together(workdir, [sys.executable, "-m", "lightscale", *fit_args(workdir, 1), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "1"])  # fmt: skip
    losses, weights = results(workdir, 1)
    assert losses == pytest.approx(metrics_losses(workdir), rel=1e-6)  # the probe reads what the run logged
    assert losses[-1] < losses[0]
    return losses, {k.removeprefix("net."): v for k, v in weights.items()}


def strip(result: tuple[list[float], dict[str, torch.Tensor]]) -> tuple[list[float], dict[str, torch.Tensor]]:
    losses, weights = result
    return losses, {k.removeprefix("net."): v for k, v in weights.items()}


def test_tensor_parallel_matches_one_process(one_process: tuple, tmp_path: Path) -> None:
    """TP=2 (Lightning's launcher, 2 processes): every rank reads the whole batch."""
    preset = ["--config", str(CONFIGS / "trainer" / "tp.yaml"), "--trainer.accelerator", "cpu"]
    run_together(tmp_path, [sys.executable, "-m", "lightscale", *fit_args(tmp_path, 1), *preset])
    result = strip(results(tmp_path, 2, {"net.blocks.0.attn.q.weight": ("data_parallel", "tensor_parallel")}))
    assert result[0] == pytest.approx(metrics_losses(tmp_path), rel=1e-6)  # metrics.csv: the global loss here
    compare("tp=2", one_process, result)


def test_fsdp2_x_tensor_parallel_matches_one_process(one_process: tuple, tmp_path: Path) -> None:
    """FSDP2(2) x TP(2): 4 processes under torchrun (Lightning's launcher refuses more processes than cores)."""
    preset = ["--config", str(CONFIGS / "trainer" / "fsdp-tp.yaml"), "--trainer.accelerator", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "-m"]
    run_together(tmp_path, [*torchrun, "lightscale", *fit_args(tmp_path, 2), *preset])
    meshes = {
        "net.blocks.1.mlp.c_proj.weight": ("data_parallel", "tensor_parallel"),  # TP, then FSDP2 over data_parallel
        "net.wte.weight": ("data_parallel",),  # out of the TP plan: FSDP2 only
    }
    compare("fsdp2=2 x tp=2", one_process, strip(results(tmp_path, 4, meshes)))


def test_hybrid_shard_two_nodes_matches_one_process(one_process: tuple, tmp_path: Path) -> None:
    """HSDP over two torchrun agents ("nodes", 2 processes each, c10d rendezvous on 127.0.0.1): sharded within a
    node, replicated across the two."""
    port, rdzv_id = free_port(), f"ls-{uuid.uuid4().hex[:8]}"
    agent = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
        "--local-addr", "127.0.0.1",
    ]  # fmt: skip
    preset = ["--config", str(CONFIGS / "trainer" / "hsdp.yaml"), "--trainer.accelerator", "cpu"]
    fit = [*fit_args(tmp_path, 4), *preset]
    run_together(tmp_path, *([*agent, "--node_rank", str(rank), "-m", "lightscale", *fit] for rank in (0, 1)))
    meshes = {"net.blocks.0.attn.q.weight": ("replicate", "shard"), "net.wte.weight": ("replicate", "shard")}
    compare("hsdp 2x2", one_process, strip(results(tmp_path, 4, meshes)))


def test_heads_that_do_not_split_are_refused(tmp_path: Path) -> None:
    """n_head 3 over 2 tensor-parallel ranks: one line naming the keys and values (printed by each process), exit 2,
    no run directory left behind."""
    preset = ["--config", str(CONFIGS / "trainer" / "tp.yaml"), "--trainer.accelerator", "cpu"]
    sizes = ["--model.init_args.n_head", "3", "--model.init_args.n_embd", "33"]
    proc = subprocess.run(
        [sys.executable, "-m", "lightscale", *fit_args(tmp_path, 1), *preset, *sizes],
        cwd=tmp_path, env=launcher_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    errors = {line for line in proc.stderr.splitlines() if line.startswith("lightscale: error: ")}
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "model.n_head=3 and model.n_embd=33" in errors.pop() and "tensor_parallel_size=2" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "runs").glob("*/*"))
