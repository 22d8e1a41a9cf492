"""Causal language modelling: next-token cross-entropy training of :class:`~lightscale.nets.gpt.GPT`.

Everything needed to go from a laptop CPU to multi-GPU lives here: the optimizer (AdamW by default) with the usual
no-decay groups, a schedule planned over the run (warm-up + cosine by default), optional regional
``torch.compile`` and activation checkpointing, and FSDP2 sharding (with tensor parallelism inside each block when
``tensor_parallel_size`` > 1, or hybrid sharding) when the Trainer runs ``ModelParallelStrategy``.
"""

import contextlib
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightscale.core.errors import UserError
from lightscale.nets.gpt import GPT, GPTConfig
from lightscale.schedules import WarmupCosine, build_scheduler
from lightscale.training.parallel import clip_grad_norm, fsdp2, fsdp_mesh, tensor_parallel, tensor_parallel_size


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


def _eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly: sampling changes the sequence length every token, which would make a
    compiled model recompile."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


class CausalLM(L.LightningModule):
    """Trains a GPT to predict the next token; ``vocab_size`` is linked from the DataModule by the CLI.

    Batches are int64 tensors of shape (batch, block_size + 1): inputs are ``batch[:, :-1]``, targets
    ``batch[:, 1:]``.

    Args:
        vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias: the :class:`GPTConfig`.
        lr: peak learning rate, given to the optimizer.
        weight_decay: applied to the weight matrices of Linear layers only (see :func:`param_groups`).
        optimizer: any ``torch.optim`` class (or callable taking parameter groups), e.g. in YAML
            ``{class_path: torch.optim.AdamW, init_args: {betas: [0.9, 0.95]}}``; it gets ``lr`` from here.
        scheduler: an LR schedule stepped every optimizer step, planned over the run's length
            (:mod:`lightscale.schedules`: warm-up + cosine by default); ``null`` for a constant lr.
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
        weight_decay: NonNegativeFloat = 0.1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = WarmupCosine,
        compile: bool = False,
        activation_checkpointing: bool = False,
        max_new_tokens: PositiveInt = 200,
        temperature: NonNegativeFloat = 0.8,
        top_k: PositiveInt | None = 200,
        sample_prompt: str | None = "\n",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer, self.scheduler = optimizer, scheduler
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
        """Compile, split each block over the tensor-parallel ranks (when ``tensor_parallel_size`` > 1), then shard
        with FSDP2 (one unit per block, then the root with embeddings and head), once, before the optimizer is
        created. Parallelism applies only under ``ModelParallelStrategy`` (docs/parallelism.md)."""
        if self._parallelized:
            return
        self._parallelized = True
        if self.hparams.compile:
            for block in self.net.blocks:
                block.compile()
        if self.device_mesh is None:  # not under ModelParallelStrategy (or not in a Trainer at all)
            return
        tp = tensor_parallel_size(self)
        if tp > 1:
            hp = self.hparams
            if hp.n_head % tp or hp.n_embd % tp:
                raise UserError(
                    f"model.n_head={hp.n_head} and model.n_embd={hp.n_embd} (and 4 x n_embd) must be divisible by "
                    f"trainer.strategy tensor_parallel_size={tp}: each tensor-parallel rank holds whole heads"
                )
            tensor_parallel(self.net.blocks, self.device_mesh["tensor_parallel"])
        fsdp2(self.net, self.net.blocks, fsdp_mesh(self), str(self.trainer.precision))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm with :func:`~lightscale.training.parallel.clip_grad_norm` under tensor parallelism, whose
        parameters live on two meshes (torch's own clip refuses them); Lightning's clipping otherwise."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and tensor_parallel_size(self) > 1:
            clip_grad_norm(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

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
        self.log("train/loss", loss)  # not on the progress bar: it reads every step, a host sync on a GPU
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), on_epoch=True, prog_bar=True, sync_dist=True)

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.net, self.hparams.weight_decay, self.decay_embeddings)
        optimizer = self.optimizer(groups, lr=self.hparams.lr)
        if self.scheduler is None:
            return optimizer
        scheduler = build_scheduler(self.scheduler, optimizer, self.trainer.estimated_stepping_batches)
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
