"""Train the tiny GPT on 2 CPU processes and save what each rank ended with (for tests/test_gpt_cli.py).

    python tests/scripts/gpt_distributed.py {ddp|fsdp} OUT_DIR CORPUS

Lightning's launcher re-runs this script for rank 1. Each rank writes OUT_DIR/<strategy>-rank<r>.pt with its
first training batch, its initial and final *full* weights (gathered from the shards under FSDP2) and the
validation loss.
"""

import sys
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightscale.data.text import TextDataModule
from lightscale.models.causal_lm import CausalLM
from lightscale.schedules import WarmupCosine


class Record(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = self.full_weights(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "first_batch"):
            self.first_batch = batch.clone()

    @staticmethod
    def full_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)  # every rank gets everything
        return {k: v.detach().clone() for k, v in get_model_state_dict(module, options=options).items()}


def main() -> None:
    strategy_name, out, corpus = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    strategy = (
        DDPStrategy() if strategy_name == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    )
    L.seed_everything(0, verbose=False)
    data = TextDataModule(
        path=corpus,
        tokenizer="char",
        block_size=32,
        batch_size=8,
        train_samples_per_epoch=8 * 2 * 10,
        val_batches=2,
        cache_dir=str(out / "cache"),
    )
    model = CausalLM(
        vocab_size=data.vocab_size,
        block_size=32,
        n_layer=2,
        n_head=2,
        n_embd=32,
        lr=3e-3,
        scheduler=partial(WarmupCosine, warmup_steps=2),
        sample_prompt="Tyger",  # generation after validation must not hang under FSDP2
        max_new_tokens=8,
    )
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=8,
        val_check_interval=8,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[record],
        default_root_dir=out,
    )
    trainer.fit(model, data)
    torch.save(
        {
            "first_batch": record.first_batch,
            "initial": record.initial,
            "final": record.full_weights(model),
            "val_loss": trainer.callback_metrics["val/loss"].item(),
            "world_size": trainer.world_size,
        },
        out / f"{strategy_name}-rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
