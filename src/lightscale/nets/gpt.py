"""A decoder-only transformer (GPT-2 style), small enough to read in one sitting.

Pre-norm blocks, learned absolute positions, a weight-tied output head and PyTorch's fused attention
(``scaled_dot_product_attention``, which picks a flash / memory-efficient kernel when one applies). The
blocks live in ``GPT.blocks`` (an ``nn.ModuleList``) so that FSDP2, activation checkpointing and regional
``torch.compile`` can each treat one block as their unit.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    """Architecture of :class:`GPT`; the defaults are nanoGPT's "baby GPT" for character-level Shakespeare."""

    vocab_size: int = 256
    block_size: int = 256  # longest context the position table covers
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    # biases in Linear and LayerNorm layers; without them training is a bit faster and no worse
    bias: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only attends to positions <= t.

    q, k and v are separate Linears (not one fused ``c_attn``) so that tensor parallelism can shard each by
    output features, i.e. by heads; the forward reads the head count from its input (``-1`` heads of a fixed
    ``head_dim``), so it runs unchanged on a rank that holds only some of the heads."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.v = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.register_load_state_dict_pre_hook(_split_fused_qkv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, _ = x.shape
        # (B, T, heads * head_dim) -> (B, heads, T, head_dim); heads are this rank's heads under tensor parallelism
        q, k, v = (proj(x).view(batch, time, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(batch, time, -1)
        return self.resid_dropout(self.c_proj(y))


def _split_fused_qkv(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """Load checkpoints written when q, k, v were one fused ``c_attn`` Linear (output features q | k | v)."""
    for name in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}c_attn.{name}", None)
        if fused is not None:
            for key, part in zip("qkv", fused.chunk(3), strict=True):
                state_dict[f"{prefix}{key}.{name}"] = part


class MLP(nn.Module):
    """Position-wise feed-forward network with a 4x hidden expansion."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, a final LayerNorm and a head tied to the embedding.

    Args:
        config: the architecture.
        activation_checkpointing: recompute each block's activations in the backward pass instead of storing
            them (``torch.utils.checkpoint``): less memory for ~30% more compute. Also settable later as an
            attribute.
    """

    def __init__(self, config: GPTConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017): one matrix embeds tokens and scores them, saving vocab x n_embd
        # parameters (38M of GPT-2 small's 124M) and training at least as well.
        self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        residual stream scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits of shape (B, T, vocab) for token ids ``idx`` of shape (B, T); with ``targets`` (B, T) also
        the mean next-token cross-entropy (targets of -1 are ignored)."""
        time = idx.size(1)
        if time > self.config.block_size:
            raise ValueError(f"sequence length {time} exceeds the model's block_size {self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights counted once). ``non_embedding`` leaves out the position table, as in
        the scaling-law papers; the token table stays in because, tied, it is also the output layer."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N for the weight matmuls plus
        12 * layers * heads * head_dim * context for attention (PaLM, appendix B; nanoGPT's estimate_mfu).
        The context is ``seq_len`` (default: ``block_size``)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens, feeding predictions back in.

        The context is cropped to the last ``block_size`` tokens. ``temperature`` 0 means greedy decoding;
        ``top_k`` keeps only the k most likely tokens. Call ``eval()`` first so dropout is off. There is no
        KV cache: each step re-runs the (cropped) context, which is fine at this scale.
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits = self(context)[:, -1, :].float()
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
