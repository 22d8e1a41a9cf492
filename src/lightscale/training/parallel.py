"""Sharding under Lightning's ``ModelParallelStrategy``: FSDP2 for the models, and a guard for models that shard
nothing (their ranks would silently train apart: that strategy adds no gradient synchronisation of its own)."""

from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightscale.core.errors import UserError


def fsdp2(module: nn.Module, units: Iterable[nn.Module], mesh: object, precision: str) -> None:
    """Shard ``module`` with FSDP2 (``fully_shard``) over ``mesh``: each of ``units`` (e.g. the transformer blocks)
    gathers its parameters on its own, just before it runs, then the root takes what is left (embeddings, head).

    Under ``bf16-mixed`` the gathered weights are bf16 and gradients are reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision == "bf16-mixed":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by FSDP2 or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in module.parameters())


class ShardingCheck(L.Callback):
    """Under ``ModelParallelStrategy`` with more than one process, refuse a LightningModule whose
    ``configure_model`` sharded nothing, in one line, before its first step."""

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, ModelParallelStrategy) and trainer.world_size > 1 and not is_sharded(pl_module):
            raise UserError(
                f"trainer.strategy ModelParallelStrategy: {type(pl_module).__name__}.configure_model shards nothing "
                "(no FSDP2 or tensor parallelism), so its processes would train apart; apply "
                "lightscale.training.parallel.fsdp2 there (as the example models do), or use configs/trainer/ddp.yaml"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)
