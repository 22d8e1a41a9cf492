"""What your LightningModule and LightningDataModule may offer the template, and what each buys.

Nothing here is required: any importable module trains through the CLI. Each item below switches on something;
where a run depends on it, a missing or half-done one is reported in one line (not a traceback).

=====================================================  ==========================================================
offer                                                  what it buys
=====================================================  ==========================================================
log ``val/loss`` (or set ``checkpoint.monitor`` and    best-checkpoint selection and early stopping; without it,
``early_stopping.init_args.monitor`` to your metric)   ``last.ckpt`` only (said once, after the first validation)
data ``num_classes`` / ``vocab_size`` attribute        linked into the model's argument of the same name
                                                       (:class:`HasClasses`, :class:`HasVocabulary`)
model ``tokens_in_batch(batch)`` and                   tokens/s and MFU from ``ThroughputLogger``
``flops_per_token(seq_len)`` (:class:`CountsTokens`),  (samples/s always)
or a ``flops_per_batch`` attribute
``StatefulDataLoader`` (torchdata) for training,       a resume in the middle of an epoch continues with exactly
with a seeded sampler                                  the batches that were left (else the epoch restarts)
epoch metrics in torchmetrics objects made             epoch-level metrics of a mid-epoch resume equal to those of
``persistent(True)``                                   an uninterrupted run
``configure_model`` that shards under                  training under ``configs/trainer/fsdp.yaml``
``ModelParallelStrategy`` (``lightscale.training.
parallel.fsdp2``)
=====================================================  ==========================================================
"""

from typing import Any, Protocol, runtime_checkable

from lightscale.core.errors import UserError

MONITOR = "val/loss"  # what the template's checkpoint and early-stopping defaults watch


@runtime_checkable
class HasClasses(Protocol):
    num_classes: int


@runtime_checkable
class HasVocabulary(Protocol):
    vocab_size: int


@runtime_checkable
class CountsTokens(Protocol):
    """A language model that says how much work a batch is, for tokens/s and MFU."""

    def tokens_in_batch(self, batch: Any) -> int: ...

    def flops_per_token(self, seq_len: int | None) -> int: ...


def check_counts_tokens(model: object) -> bool:
    """Whether ``model`` offers :class:`CountsTokens`; one line when it offers only half of it."""
    offered = [name for name in ("tokens_in_batch", "flops_per_token") if callable(getattr(model, name, None))]
    if len(offered) == 1:
        missing = "flops_per_token(seq_len)" if offered == ["tokens_in_batch"] else "tokens_in_batch(batch)"
        raise UserError(
            f"{type(model).__name__} defines {offered[0]} but not {missing}: tokens/s and MFU need both "
            "(see lightscale.contract.CountsTokens)"
        )
    return len(offered) == 2
