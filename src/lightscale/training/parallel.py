"""Sharding under Lightning's ``ModelParallelStrategy``: FSDP2, tensor parallelism (TP) and hybrid sharding (HSDP)
for the models, a gradient clip for parameters on several meshes, and a guard for models that shard nothing (their
ranks would silently train apart: that strategy adds no gradient synchronisation of its own).

The models call :func:`fsdp_mesh` / :func:`tensor_parallel_size` instead of reading ``device_mesh`` themselves, so
the same ``configure_model`` runs under FSDP2, FSDP2 x TP and :class:`HybridShardStrategy`.
See docs/parallelism.md for when to choose which.
"""

import math
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightscale.core.errors import UserError
from lightscale.training.strategy import ModelParallelStrategy as AtomicModelParallelStrategy

# Which Linear of a GPT block is split how (the keys are module paths inside one ``Block``). Column-wise layers
# split their output features (q, k, v: whole heads; the MLP's up-projection: a slice of the hidden units) and
# keep their input replicated; the row-wise layers that follow take those local slices and all-reduce their
# output, so each block costs two all-reduces forward and two backward. Norms, dropout, embeddings and the
# (tied) head stay out of the plan: replicated over TP ranks, sharded by FSDP2 over data-parallel ranks. Sequence
# parallelism (norms and dropout on sequence shards) would save their activation memory, but needs DTensor
# layouts at every block boundary and for the tied embedding/head; at the sizes this template trains the saving
# is small, so it is left out.
GPT_BLOCK_PLAN = {
    "attn.q": "colwise",
    "attn.k": "colwise",
    "attn.v": "colwise",
    "attn.c_proj": "rowwise",
    "mlp.c_fc": "colwise",
    "mlp.c_proj": "rowwise",
}


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


def tensor_parallel(blocks: Iterable[nn.Module], mesh: Any, plan: dict[str, str] | None = None) -> None:
    """Apply tensor parallelism over ``mesh`` (1-D, the ``tensor_parallel`` dim) to each of ``blocks``, following
    ``plan`` (module path -> ``"colwise"`` / ``"rowwise"``; default :data:`GPT_BLOCK_PLAN`). Run it before
    :func:`fsdp2`, which then shards the resulting DTensors over the data-parallel dim (2-D parallelism)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in blocks:
        parallelize_module(block, mesh, {path: styles[style]() for path, style in (plan or GPT_BLOCK_PLAN).items()})


def tensor_parallel_size(module: L.LightningModule) -> int:
    """Size of the strategy's ``tensor_parallel`` mesh dim (1 when there is no device mesh)."""
    mesh = module.device_mesh
    return mesh["tensor_parallel"].size() if mesh is not None else 1


def fsdp_mesh(module: L.LightningModule) -> Any:
    """The mesh FSDP2 should shard ``module`` over: ``data_parallel`` (1-D) normally, ``(replicate, shard)`` (2-D)
    under :class:`HybridShardStrategy`. The models ask here so one ``configure_model`` serves both."""
    strategy = module.trainer.strategy
    if isinstance(strategy, HybridShardStrategy):
        return strategy.hybrid_mesh
    return module.device_mesh["data_parallel"]


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that are DTensors on *different* meshes (FSDP2 x TP:
    the blocks' Linears live on the 2-D (data_parallel, tensor_parallel) mesh, embeddings and norms on the 1-D
    data_parallel one), which torch's version refuses (it stacks the per-parameter norms). Each mesh's norm is
    computed on its own and made a plain tensor (``full_tensor``), then they are combined, as torchtitan does.
    Returns the total norm."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[nn.Parameter]] = {}  # mesh (None: plain tensors) -> parameters with gradients
    for param in parameters:
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(mesh, []).append(param)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    stacked = torch.stack(norms)
    total = stacked.max() if math.isinf(norm_type) else torch.linalg.vector_norm(stacked, norm_type)
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class HybridShardStrategy(AtomicModelParallelStrategy):
    """HSDP: FSDP2 sharding within groups of ``shard_size`` processes (default: the devices of one node) and
    replication across the groups, i.e. ``fully_shard`` over a 2-D (replicate, shard) mesh. Parameters are
    gathered over the fast intra-node links only; across nodes just the gradients are all-reduced, once per
    step. Memory per device is that of FSDP2 over one node, so choose it when one node holds the sharded model.

    ``data_parallel_size`` must still equal the number of processes (devices x num_nodes): the data loader
    shards over all of them. Tensor parallelism is not combined with it here (``tensor_parallel_size`` 1).
    """

    def __init__(
        self,
        data_parallel_size: int,
        shard_size: int | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = timedelta(minutes=30),
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.shard_size = shard_size
        self._hybrid_mesh: Any = None

    @property
    def hybrid_mesh(self) -> Any:
        """The (replicate, shard) mesh FSDP2 shards over; available once processes have started."""
        if self._hybrid_mesh is None:
            raise RuntimeError("HybridShardStrategy.hybrid_mesh is built when the processes start (setup_environment)")
        return self._hybrid_mesh

    def setup_environment(self) -> None:
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        world = self.device_mesh["data_parallel"].size()
        shard = self.shard_size or self.num_processes
        if shard < 1 or world % shard:
            raise UserError(
                f"trainer.strategy HybridShardStrategy: shard_size={shard} must divide the number of processes, "
                f"{world} (devices x num_nodes)"
            )
        # Same rank order as Lightning's mesh: rank = replica * shard + position, so a shard group is one node
        # when shard_size is the devices per node.
        self._hybrid_mesh = init_device_mesh(
            self.root_device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
        )


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by FSDP2 or tensor parallelism)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(param, DTensor) for param in module.parameters())


def is_tensor_parallel(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor on a mesh with a ``tensor_parallel`` dim."""
    from torch.distributed.tensor import DTensor

    return any(
        isinstance(param, DTensor) and "tensor_parallel" in (param.device_mesh.mesh_dim_names or ())
        for param in module.parameters()
    )


class ShardingCheck(L.Callback):
    """Under ``ModelParallelStrategy`` with more than one process, refuse in one line, before the first step, a
    LightningModule whose ``configure_model`` sharded nothing (its processes would train apart), or applied no
    tensor-parallel plan while ``tensor_parallel_size`` > 1 (its tensor-parallel ranks would all do the same
    work on the same batch: a silent waste of devices)."""

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, ModelParallelStrategy) or trainer.world_size == 1:
            return
        name = type(pl_module).__name__
        if not is_sharded(pl_module):
            raise UserError(
                f"trainer.strategy ModelParallelStrategy: {name}.configure_model shards nothing "
                "(no FSDP2 or tensor parallelism), so its processes would train apart; apply "
                "lightscale.training.parallel.fsdp2 there (as the example models do), or use configs/trainer/ddp.yaml"
            )
        tp = strategy.device_mesh["tensor_parallel"].size()
        if tp > 1 and not is_tensor_parallel(pl_module):
            raise UserError(
                f"trainer.strategy ModelParallelStrategy: tensor_parallel_size={tp} but {name}.configure_model "
                "applies no tensor-parallel plan, so those ranks would repeat each other's work; use "
                "configs/trainer/fsdp.yaml (tensor_parallel_size 1), or split the model with "
                "lightscale.training.parallel.tensor_parallel as CausalLM does"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer, pl_module)
