"""Causal language modelling: next-token cross-entropy training of :class:`~lightscale.nets.gpt.GPT`.

Everything needed to go from a laptop CPU to multi-GPU lives here: AdamW with the usual no-decay groups,
linear warm-up + cosine decay stepped per optimizer step, optional regional ``torch.compile`` and
activation checkpointing, and FSDP2 sharding when the Trainer runs ``ModelParallelStrategy``.
"""

import contextlib
import math
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightscale.models.hook_state import FastHookState
from lightscale.models.optim import warmup_cosine
from lightscale.nets.gpt import GPT, GPTConfig


def param_groups(module: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices of Linear layers only; none on biases, norms or embeddings
    (decaying them pulls scales and rare-token rows towards zero for no regularisation benefit).
    ``decay_embeddings`` decays every matrix, embeddings included (nanoGPT's grouping). A tied parameter is
    placed once, by the first module that owns it (the embedding, for GPT's tied head)."""
    decay, no_decay, seen = [], [], set()
    for submodule in module.modules():
        for param in submodule.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            exempt = isinstance(submodule, nn.Embedding) and not decay_embeddings
            (decay if param.ndim >= 2 and not exempt else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Factor on ``lr`` at optimizer step ``step``: linear warm-up, then cosine decay to ``min_lr`` at
    ``total_steps`` and flat after (nanoGPT's ``get_lr``)."""
    return warmup_cosine(step, warmup_steps, total_steps, floor=min_lr / lr)


def _eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly: sampling changes the sequence length every token, which would make a
    compiled model recompile."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


class CausalLM(FastHookState, L.LightningModule):
    """Trains a GPT to predict the next token; ``vocab_size`` is linked from the DataModule by the CLI.

    Batches are int64 tensors of shape (batch, block_size + 1): inputs are ``batch[:, :-1]``, targets
    ``batch[:, 1:]``.

    Args:
        vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias: the :class:`GPTConfig`.
        lr, min_lr: peak learning rate and the floor the cosine decays to.
        warmup_steps: linear warm-up length in optimizer steps.
        max_steps: length of the cosine decay; ``None`` takes the Trainer's estimated optimizer steps.
        weight_decay, betas: AdamW settings (decay applies to Linear weights only).
        fused: fused AdamW kernel; ``None`` means on CUDA only.
        compile: ``torch.compile`` each transformer block (regional compilation: compiled once, reused by
            every block, and FSDP's hooks stay outside the compiled graphs).
        activation_checkpointing: recompute block activations in backward to save memory.
        max_new_tokens, temperature, top_k: sampling in ``predict`` and for the validation samples.
        sample_prompt: after each validation, continue this prompt and log the text (``None``: don't).
    """

    decay_embeddings = False  # see param_groups; a subclass may switch it on (benchmarks/ does, for parity)

    def __init__(
        self,
        vocab_size: PositiveInt = 256,
        block_size: PositiveInt = 256,
        n_layer: PositiveInt = 6,
        n_head: PositiveInt = 6,
        n_embd: PositiveInt = 384,
        dropout: ClosedUnitInterval = 0.0,
        bias: bool = False,
        lr: PositiveFloat = 1e-3,
        min_lr: NonNegativeFloat = 1e-4,
        warmup_steps: NonNegativeInt = 100,
        max_steps: PositiveInt | None = None,
        weight_decay: NonNegativeFloat = 0.1,
        betas: tuple[ClosedUnitInterval, ClosedUnitInterval] = (0.9, 0.99),
        fused: bool | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        max_new_tokens: PositiveInt = 200,
        temperature: NonNegativeFloat = 0.8,
        top_k: PositiveInt | None = 200,
        sample_prompt: str | None = "\n",
    ) -> None:
        super().__init__()
        if min_lr > lr:
            raise ValueError(f"model.min_lr ({min_lr}) must not exceed model.lr ({lr})")
        self.save_hyperparameters()
        config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)
        self.net = GPT(config, activation_checkpointing=activation_checkpointing)
        self._flops_per_token: dict[int | None, int] = {}
        self._parallelized = False
        self._sample_prompt_ok = True

    # -- the model ---------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token at context ``seq_len``, for MFU (see :meth:`GPT.flops_per_token`)."""
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = self.net.flops_per_token(seq_len)
        return self._flops_per_token[seq_len]

    @staticmethod
    def tokens_in_batch(batch: torch.Tensor) -> int:
        """Tokens trained on in ``batch`` (read from its shape: no device sync)."""
        return batch.shape[0] * (batch.shape[1] - 1)

    def configure_model(self) -> None:
        """Compile and shard (FSDP2: one unit per block, then the root with embeddings and head) once, before
        the optimizer is created. Sharding applies only under ``ModelParallelStrategy``."""
        if self._parallelized:
            return
        self._parallelized = True
        if self.hparams.compile:
            for block in self.net.blocks:
                block.compile()
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = self.device_mesh["data_parallel"]
            policy = MixedPrecisionPolicy()
            if self.trainer.precision == "bf16-mixed":  # gather bf16 weights, reduce gradients in fp32
                policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in self.net.blocks:
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(self.net, mesh=mesh, mp_policy=policy)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_block = getattr(datamodule, "block_size", None)
        if isinstance(data_block, int) and data_block > self.hparams.block_size:
            raise ValueError(f"data.block_size ({data_block}) exceeds model.block_size ({self.hparams.block_size})")

    # -- training ----------------------------------------------------------------------------------------

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        _, loss = self.net(batch[:, :-1], batch[:, 1:])
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # Not on the progress bar: it reads its metrics every step, which would sync the host with the GPU.
        self.log("train/loss", loss, on_step=True)
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            # only at the logging cadence: self.log copies a Python float to the device, a blocking copy
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), on_epoch=True, prog_bar=True, sync_dist=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        fused = self.device.type == "cuda" if hp.fused is None else hp.fused
        optimizer = torch.optim.AdamW(
            param_groups(self.net, hp.weight_decay, self.decay_embeddings),
            lr=hp.lr,
            betas=tuple(hp.betas),
            fused=fused or None,
        )
        total = hp.max_steps or self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set model.max_steps or trainer.max_steps: the LR schedule needs a length")
        total = int(total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, hp.lr, hp.min_lr, hp.warmup_steps, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- text --------------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The DataModule's tokenizer (``None`` when there is none)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def generate(
        self, idx: torch.Tensor, max_new_tokens: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Continue ``idx`` (B, T) with the configured sampling settings."""
        hp = self.hparams
        with _eager():
            return self.net.generate(
                idx, max_new_tokens or hp.max_new_tokens, hp.temperature, hp.top_k, generator=generator
            )

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[str] | torch.Tensor:
        """Continue each prompt; returns the texts (prompt included), or token ids without a tokenizer."""
        out = self.generate(batch)
        tokenizer = self.tokenizer
        return [tokenizer.decode(row) for row in out.cpu()] if tokenizer is not None else out

    def on_validation_epoch_end(self) -> None:
        """Log a short sample so progress is visible as text, not just as a loss.

        Every rank generates (under FSDP2 every forward needs all ranks) from a generator seeded with the
        step, so the global RNG, and with it the training stream, is untouched."""
        prompt, tokenizer = self.hparams.sample_prompt, self.tokenizer
        if self.trainer.sanity_checking or not prompt or tokenizer is None or not self._sample_prompt_ok:
            return
        try:
            encoded = tokenizer.encode(prompt)
        except ValueError as error:  # e.g. a character the char tokenizer's corpus never had
            rank_zero_warn(f"model.sample_prompt cannot be encoded ({error}); no samples will be logged")
            self._sample_prompt_ok = False
            return
        ids = torch.as_tensor(encoded, dtype=torch.long, device=self.device)[None]
        generator = torch.Generator(device=self.device).manual_seed(self.global_step)
        text = tokenizer.decode(self.generate(ids, generator=generator)[0].cpu())
        if self.trainer.is_global_zero:
            self._log_text(text)

    def _log_text(self, text: str) -> None:
        step = self.global_step
        rank_zero_info(f"Sample at step {step}:\n{text}\n")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text(key="samples", columns=["step", "text"], data=[[step, text]])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", text, step)
