"""nanoGPT's "I only have a cheap computer" run, reproduced with CausalLM + TextDataModule + Trainer.

nanoGPT (README, shakespeare_char on a CPU):
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
reports val loss 1.88. Same model and recipe here: character tokens, the last 10% of the characters
validate, AdamW lr 1e-3 -> 1e-4 (cosine, 100 warm-up steps), betas (0.9, 0.99), weight decay 0.1, gradient
clipping 1.0, no biases, and nanoGPT's weight-decay grouping (every matrix, embeddings included; our
default exempts embeddings). Evaluation: nanoGPT averages 20 random batches of 12; we average 20 fixed,
seeded batches of 12 windows from the same validation split (the pass/fail figure), and also report the
loss over the whole validation split cut into consecutive 64-character windows (every character predicted
once, with the same mix of context lengths as random windows), which has far less sampling noise.

Usage: python benchmarks/nanogpt_shakespeare.py [SEED]  (default 1337; seeds the model and the windows).
The corpus is ../shared/data/tinyshakespeare.txt relative to the repository root, or $LIGHTSCALE_SHAKESPEARE.
Exits 1 if the validation loss is above 1.89.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

from _common import setup_quiet

REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 1.89
NANOGPT_VAL_LOSS = 1.88
STEPS, BATCH, BLOCK = 2000, 12, 64


def whole_split_loss(net, path: Path, dtype) -> float:
    """Mean next-token loss over a whole token file cut into consecutive windows of BLOCK + 1 tokens."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    tokens = torch.from_numpy(np.fromfile(path, dtype=dtype).astype(np.int64))
    device = next(net.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        starts = list(range(0, len(tokens) - BLOCK - 1, BLOCK))
        for i in range(0, len(starts), 256):
            batch = torch.stack([tokens[s : s + BLOCK + 1] for s in starts[i : i + 256]]).to(device)
            logits = net(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum")
            total, count = total + loss.item(), count + batch[:, 1:].numel()
    return total / count


def main() -> int:
    corpus = Path(os.environ.get("LIGHTSCALE_SHAKESPEARE") or REPO.parent / "shared/data/tinyshakespeare.txt")
    if not corpus.is_file():
        print(f"skipped: corpus not found ({corpus}; set LIGHTSCALE_SHAKESPEARE)")
        return 0

    from functools import partial

    import lightning as L
    import torch

    from lightscale.data.corpus import token_dtype
    from lightscale.data.text import TextDataModule
    from lightscale.models.causal_lm import CausalLM
    from lightscale.schedules import WarmupCosine

    class NanoGPTRecipe(CausalLM):
        decay_embeddings = True  # nanoGPT decays every parameter with >= 2 dims

    setup_quiet()
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1337
    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    data = TextDataModule(
        path=str(corpus),
        tokenizer="char",
        block_size=BLOCK,
        batch_size=BATCH,
        val_fraction=0.1,
        train_samples_per_epoch=STEPS * BATCH,
        val_batches=20,
        seed=seed,
    )
    model = NanoGPTRecipe(
        vocab_size=data.vocab_size,
        block_size=BLOCK,
        n_layer=4,
        n_head=4,
        n_embd=128,
        dropout=0.0,
        bias=False,
        lr=1e-3,
        weight_decay=0.1,
        optimizer=partial(torch.optim.AdamW, betas=(0.9, 0.99)),
        scheduler=partial(WarmupCosine, total_steps=STEPS, warmup_steps=100, min_lr_ratio=0.1),
        sample_prompt=None,
    )
    with tempfile.TemporaryDirectory() as root:  # nothing is written: no logger, no checkpoints
        trainer = L.Trainer(
            max_steps=STEPS,
            limit_val_batches=0,  # validate once, at the end (nanoGPT's final eval at iter 2000)
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
        )
        trainer.fit(model, data)
        fit_seconds = time.perf_counter() - start
        trainer.limit_val_batches = 1.0
        val_loss = trainer.validate(model, data, verbose=False)[0]["val/loss"]
    wall = time.perf_counter() - start
    full_val = whole_split_loss(model.net.eval(), data.shard_dir / "val.bin", token_dtype(data.vocab_size))

    print(
        f"nanogpt_shakespeare: val loss {val_loss:.4f} after {trainer.global_step} steps "
        f"(nanoGPT README: {NANOGPT_VAL_LOSS}; threshold {THRESHOLD}); wall {wall:.0f} s "
        f"(fit {fit_seconds:.0f} s, {1000 * fit_seconds / STEPS:.0f} ms/step) on {trainer.strategy.root_device}; "
        f"whole val split: {full_val:.4f}"
    )
    if val_loss > THRESHOLD:
        print(f"FAILED: val loss {val_loss:.4f} > {THRESHOLD}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
