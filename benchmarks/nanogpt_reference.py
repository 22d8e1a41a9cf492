"""The reference arm of the quality benchmark: nanoGPT's own training loop for its CPU Shakespeare setting, in
plain PyTorch, on the same corpus and split as benchmarks/nanogpt_shakespeare.py.

nanoGPT's README reports val loss 1.88 for this setting; that is a single run, scored on 20 random batches.
Running the reference loop here, beside the template, tells whether a gap to 1.88 is the template's or the
run-to-run noise of the recipe itself. Written from nanoGPT's train.py / model.py (not imported: nanoGPT is not
a package): char tokens in first-seen-sorted order, the last 10% of characters validate, GPT-2 init with
the residual projections scaled by 1/sqrt(2 n_layer), weight decay on every >= 2-D parameter, linear warm-up
then cosine to min_lr, clipping at 1.0, evaluation on ``EVAL_ITERS`` random batches in eval mode.

Usage: python benchmarks/nanogpt_reference.py [SEED]  (default 1337, nanoGPT's). The corpus is found as in
nanogpt_shakespeare.py. Prints ``nanogpt_reference: val loss X ...; whole val split: Y``.
"""

import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
MAX_ITERS, WARMUP, LR, MIN_LR, EVAL_ITERS = 2000, 100, 1e-3, 1e-4, 20


class Block(nn.Module):
    """nanoGPT's pre-norm block: no biases, fused causal attention, 4x GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(N_EMBD, bias=False), nn.LayerNorm(N_EMBD, bias=False)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, N_HEAD, c // N_HEAD).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(c, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, N_EMBD), nn.Embedding(BLOCK, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD, bias=False)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            for proj in (block.attn_proj, block.mlp_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * N_LAYER))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction=reduction)


def lr_at(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    ratio = (it - WARMUP) / (MAX_ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main() -> int:
    corpus = Path(os.environ.get("LIGHTSCALE_SHAKESPEARE") or REPO.parent / "shared/data/tinyshakespeare.txt")
    if not corpus.is_file():
        print(f"skipped: corpus not found ({corpus}; set LIGHTSCALE_SHAKESPEARE)")
        return 0
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1337
    torch.manual_seed(seed)
    text = corpus.read_text()
    index = {ch: i for i, ch in enumerate(sorted(set(text)))}
    data = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    train, val = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]

    def batch(split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(split) - BLOCK, (BATCH,)).tolist()
        windows = torch.stack([split[s : s + BLOCK + 1] for s in starts])
        return windows[:, :-1], windows[:, 1:]

    model = ReferenceGPT(len(index))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    start = time.perf_counter()
    x, y = batch(train)
    for it in range(MAX_ITERS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        loss = loss_of(model, x, y)
        x, y = batch(train)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    fit_seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        val_loss = sum(loss_of(model, *batch(val)).item() for _ in range(EVAL_ITERS)) / EVAL_ITERS
        # every character predicted once, in consecutive windows (the template's benchmark reports the same)
        windows = val[: (len(val) - 1) // BLOCK * BLOCK + 1]
        x, y = windows[:-1].view(-1, BLOCK), windows[1:].view(-1, BLOCK)
        whole = sum(loss_of(model, x[i : i + 256], y[i : i + 256], "sum").item() for i in range(0, len(x), 256))
        whole /= y.numel()
    print(
        f"nanogpt_reference: val loss {val_loss:.4f} after {MAX_ITERS} steps (seed {seed}); fit {fit_seconds:.0f} s "
        f"({1000 * fit_seconds / MAX_ITERS:.0f} ms/step); whole val split: {whole:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
