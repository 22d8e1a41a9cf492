"""A LightningModule and DataModule that live outside the lightscale package (used by test_external.py)."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class LineData(L.LightningDataModule):
    """y = 3x - 1 with a little noise."""

    def __init__(self, n: int = 512, batch_size: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, generator=generator)
        self.y = 3 * self.x - 1 + 0.01 * torch.randn(n, 1, generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:128], self.y[:128]), batch_size=self.batch_size)


class LineFit(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.linear(x), y)
        self.log("fit_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", torch.nn.functional.mse_loss(self.linear(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class LineDataWithTest(LineData):
    """The same data with a test split."""

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[128:256], self.y[128:256]), batch_size=self.batch_size)


class LineFitShowingProgress(LineFit):
    """Logs a metric of its own for the progress display (``prog_bar=True``), and defines no test_step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("my/slope", self.linear.weight.detach().squeeze(), prog_bar=True)
        return loss


class LineDataFromHub(LineData):
    """A DataModule that takes credentials for a data hub (which must come from the environment, not a config)."""

    def __init__(
        self,
        token: str | None = None,
        hf_token: str | None = None,
        aws_secret_access_key: str | None = None,
        private_key: str | None = None,
        db_password: str | None = None,
    ) -> None:
        super().__init__()
