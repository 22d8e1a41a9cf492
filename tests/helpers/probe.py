"""Test-only callback and data for multi-process runs (SLURM jobs, torchrun, Lightning's DDP launcher).

Runs add the callback with ``--trainer.callbacks+=helpers.probe.Probe`` and ``PYTHONPATH=<repo>/tests``; the test
then reads ``<run_dir>/probe/``: ``step-rank<R>`` (the last finished optimizer step, to time an interruption),
``weights-rank<R>.pt`` (that rank's parameters when training ended, sharded ones (DTensors: FSDP2, tensor
parallel) gathered whole: every rank ran, ranks, layouts and runs can be compared), with ``trace``,
``trace-rank<R>.txt`` (per batch: step, batch index, batch checksums, weights sum) and, with ``losses``,
``loss-rank<R>.txt`` (per batch: step and that rank's own training loss, unsynced, so a test can average the
data-parallel ranks into the global loss).
"""

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from lightscale.data import DigitsDataModule
from lightscale.data.tensor_dataset import passthrough_collate


class Probe(Callback):
    def __init__(self, step_delay: float = 0.0, trace: bool = False, losses: bool = False) -> None:
        self.step_delay = step_delay  # seconds slept after each step: a run long enough to interrupt
        self.trace = trace
        self.losses = losses

    def _dir(self, trainer: L.Trainer) -> Path:
        path = Path(trainer.default_root_dir) / "probe"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if self.trace:
            tensors = batch if isinstance(batch, (list, tuple)) else [batch]
            data = [round(float(t.double().sum()), 6) for t in tensors if isinstance(t, torch.Tensor)]
            # each parameter on its own: under FSDP2 x TP they are DTensors on two different meshes
            weights = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
            with open(self._dir(trainer) / f"trace-rank{trainer.global_rank}.txt", "a") as file:
                file.write(f"{trainer.global_step} {idx} {data} {weights:.10f}\n")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        if self.losses:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            with open(self._dir(trainer) / f"loss-rank{trainer.global_rank}.txt", "a") as file:
                file.write(f"{trainer.global_step} {float(loss):.10f}\n")
        target = self._dir(trainer) / f"step-rank{trainer.global_rank}"
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"{trainer.global_step}\n")
        os.replace(tmp, target)
        if self.step_delay:
            time.sleep(self.step_delay)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.distributed.tensor import DTensor

        weights = {  # full_tensor is a collective: every rank gathers every parameter, in the same order
            name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for name, p in pl_module.named_parameters()
        }
        meshes = {  # how each sharded parameter was laid out, e.g. ("data_parallel", "tensor_parallel")
            name: p.device_mesh.mesh_dim_names for name, p in pl_module.named_parameters() if isinstance(p, DTensor)
        }
        torch.save(
            {
                "weights": weights,
                "meshes": meshes,
                "global_step": trainer.global_step,
                "world_size": trainer.world_size,
            },
            self._dir(trainer) / f"weights-rank{trainer.global_rank}.pt",
        )


class DistributedDigits(DigitsDataModule):
    """Digits whose training loader shards with a seeded ``DistributedSampler`` under DDP.

    The stock module shuffles with torchdata's ``RandomSampler``, which is not a ``torch`` ``RandomSampler``, so
    Lightning wraps it in a ``DistributedSamplerWrapper`` whose order is drawn from the global torch generator
    when the epoch's iterator is created; a mid-epoch resume creates it at another moment and trains on other
    batches (final weights off by ~2e-2 on this test). A seeded ``DistributedSampler`` (its epoch set by
    Lightning) is replayed exactly by ``StatefulDataLoader``: resumed weights are bit-identical.
    """

    def train_dataloader(self) -> StatefulDataLoader:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return super().train_dataloader()
        sampler = DistributedSampler(self.splits["train"], shuffle=True, seed=self.hparams.seed)
        return StatefulDataLoader(
            self.splits["train"], batch_size=self.hparams.batch_size, sampler=sampler, collate_fn=passthrough_collate
        )
