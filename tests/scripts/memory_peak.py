"""Train a GPT for two steps on 2 CPU processes under FSDP2 and record what one steady-state step really used (for
tests/test_preflight.py, against the memory plan).

    python tests/scripts/memory_peak.py OUT_DIR JSON_MODEL_ARGS BATCH_SIZE [PRECISION]

Lightning's launcher re-runs this script for rank 1. Each rank writes OUT_DIR/rank<r>.json with two measurements:

- ``tracked_peak``: the most bytes of live tensors during its second training step (forward, backward, optimizer
  step), counted per allocation by torch's tensor memory tracker on the real tensors: what a GPU allocator's
  ``max_memory_allocated`` would say, without the allocator's slack;
- ``rss_growth``: the process's peak resident set (what MemoryWatch reports on a CPU) minus its resident set when
  the model was still on the meta device, so the model's, gradients', optimizer's and activations' memory, plus
  malloc's slack and whatever else the process touched meanwhile.
"""

import json
import resource
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightscale.models.causal_lm import CausalLM
from lightscale.training.memory_plan import _memory_tracker


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


class Measure(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.tracker = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.baseline = rss_bytes()  # the model is still on the meta device here

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:  # the optimizer state exists from the first step on
            self.tracker = _memory_tracker()
            self.tracker.track_external(pl_module, *trainer.optimizers)
            self.tracker.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            self.tracker.__exit__(None, None, None)
            snapshot = self.tracker.get_tracker_snapshot("peak")
            tracked = int(sum(stats["Total"] for stats in snapshot.values()))
            peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            result = {"tracked_peak": tracked, "rss_growth": peak_rss - self.baseline, "baseline": self.baseline}
            (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    out, model_args, batch_size = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    precision = sys.argv[4] if len(sys.argv) > 4 else "32-true"
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    block = model_args["block_size"]
    data = torch.randint(0, model_args["vocab_size"], (batch_size * 2 * 2, block + 1))  # 2 steps x 2 ranks
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        precision=precision,
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Measure(out)],
        default_root_dir=out,
    )
    with trainer.init_module(empty_init=True):  # meta: materialised as shards, as lightscale fit does on GPUs
        model = CausalLM(**model_args, scheduler=None, sample_prompt=None)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)  # type: ignore[arg-type]
    trainer.fit(model, train_dataloaders=loader)


if __name__ == "__main__":
    main()
