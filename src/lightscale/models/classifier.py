"""Image classification: cross-entropy training of :class:`~lightscale.nets.SmallCNN`."""

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightscale.nets import SmallCNN
from lightscale.schedules import OneCycle, build_scheduler
from lightscale.training.parallel import fsdp2, fsdp_mesh, is_sharded


class Classifier(L.LightningModule):
    """Trains a CNN on images; ``num_classes`` is linked from the DataModule by the CLI.

    Args:
        num_classes, in_channels, channels, dropout: the :class:`~lightscale.nets.SmallCNN`.
        lr: peak learning rate, given to the optimizer (and the peak of the default one-cycle schedule).
        optimizer: any ``torch.optim`` class (or callable taking the parameters), e.g. in YAML
            ``{class_path: torch.optim.SGD, init_args: {momentum: 0.9}}``; it gets ``lr`` from here.
        scheduler: an LR schedule stepped every optimizer step, planned over the run's length
            (:mod:`lightscale.schedules`); ``null`` for a constant lr.
        compile: ``torch.compile`` the network.
    """

    def __init__(
        self,
        num_classes: PositiveInt = 10,
        in_channels: PositiveInt = 1,
        channels: Sequence[PositiveInt] = (32, 64),
        dropout: ClosedUnitInterval = 0.1,
        lr: PositiveFloat = 3e-3,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = OneCycle,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer, self.scheduler = optimizer, scheduler
        self.net = SmallCNN(num_classes, in_channels, tuple(channels), dropout)
        metrics = MetricCollection(
            {"acc": MulticlassAccuracy(num_classes, average="micro"), "f1": MulticlassF1Score(num_classes)}
        )
        self.train_loss = MeanMetric()
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # Saved in checkpoints, so a run resumed in the middle of an epoch reports that epoch's metrics whole.
        self.train_loss.persistent(True)
        self.train_metrics.persistent(True)

    def configure_model(self) -> None:
        """Compile, and shard with FSDP2 when the Trainer runs ``ModelParallelStrategy`` (configs/trainer/fsdp.yaml,
        hsdp.yaml). It has no tensor-parallel plan: ShardingCheck refuses ``tensor_parallel_size`` > 1."""
        if self.hparams.compile:
            self.net.compile()  # in place: the state-dict keys stay those of the plain net
        if self.device_mesh is not None and not is_sharded(self):
            fsdp2(self.net, [], fsdp_mesh(self), str(self.trainer.precision))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_loss.update(loss.detach(), len(labels))
        self.train_metrics.update(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.val_metrics.update(logits, labels)
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("test/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.test_metrics.update(logits, labels)
        self.log_dict(self.test_metrics)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> dict[str, torch.Tensor]:
        """The most likely class of each image and its probability."""
        probability, label = self(batch[0]).softmax(dim=-1).max(dim=-1)
        return {"label": label, "probability": probability}

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameters(), lr=self.hparams.lr)
        if self.scheduler is None:
            return optimizer
        scheduler = build_scheduler(self.scheduler, optimizer, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
