"""Image classification: cross-entropy training of a CNN with DDP-correct torchmetrics."""

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
)
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightscale.models.optim import OptimizerName, SchedulerName, build_optimizer, build_scheduler
from lightscale.nets import SmallCNN


class Classifier(L.LightningModule):
    """Trains :class:`~lightscale.nets.SmallCNN`; ``num_classes`` is linked from the DataModule by the CLI.

    Metrics are torchmetrics objects logged directly, so under DDP their state is reduced across ranks
    before ``compute`` (a per-rank mean of accuracies would be wrong when ranks hold different counts).
    """

    def __init__(
        self,
        num_classes: PositiveInt = 10,
        in_channels: PositiveInt = 1,
        channels: Sequence[PositiveInt] = (32, 64),
        dropout: ClosedUnitInterval = 0.1,
        lr: PositiveFloat = 3e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        optimizer: OptimizerName = "adamw",
        scheduler: SchedulerName = "onecycle",
        warmup_steps: NonNegativeInt = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = SmallCNN(num_classes, in_channels, tuple(channels), dropout)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def configure_model(self) -> None:
        if self.hparams.compile and not isinstance(self.net, torch._dynamo.eval_frame.OptimizedModule):
            self.net = torch.compile(self.net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        metrics.update(logits, labels)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, self.train_metrics)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._shared_step(batch, self.val_metrics)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._shared_step(batch, self.test_metrics)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log_dict(self.test_metrics, on_epoch=True)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self):
        hp = self.hparams
        fused = hp.optimizer == "adamw" and self.device.type == "cuda"
        optimizer = build_optimizer(hp.optimizer, self.parameters(), hp.lr, hp.weight_decay, fused=fused)
        scheduler = build_scheduler(
            hp.scheduler, optimizer, int(self.trainer.estimated_stepping_batches), hp.warmup_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
