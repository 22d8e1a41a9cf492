"""Any importable LightningModule / DataModule works through the CLI by class_path, with no code change."""

import json
from pathlib import Path

import torch

from conftest import run_cli, run_dirs

QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


def test_a_model_defined_outside_the_package_trains_through_the_cli() -> None:
    code = run_cli(
        "fit", "--model", "external_models.LineFit", "--data", "external_models.LineData",
        "--model.lr", "0.1", "--trainer.max_epochs", "4", "--checkpoint.monitor", "val_mse", *QUIET,
    )  # fmt: skip
    assert code == 0
    (run_dir,) = run_dirs()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fit_metrics"]["val_mse"] < 0.01  # learned y = 3x - 1
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert abs(state["linear.weight"].item() - 3) < 0.1 and abs(state["linear.bias"].item() + 1) < 0.1


def test_lightning_demo_classes_run_by_class_path() -> None:
    code = run_cli(
        "fit", "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
        "--data", "lightning.pytorch.demos.boring_classes.BoringDataModule",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4", "--trainer.limit_val_batches", "2",
        *QUIET,
    )  # fmt: skip
    assert code == 0
    (run_dir,) = run_dirs()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # no "val/loss" logged: last.ckpt only
    assert not list((run_dir / "checkpoints").glob("best-*"))


THREE_FILES = {
    "mytask/model.py": '''
import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable


class Quadratic(L.LightningModule):
    """Fits y = a x^2 + b with an optimizer chosen in YAML or on the command line."""

    def __init__(self, optimizer: OptimizerCallable = torch.optim.SGD) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.a = torch.nn.Parameter(torch.zeros(()))
        self.b = torch.nn.Parameter(torch.zeros(()))

    def loss(self, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(self.a * x**2 + self.b, y)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch))

    def configure_optimizers(self):
        return self.optimizer(self.parameters())
''',
    "mytask/data.py": """
import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class QuadraticData(L.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        x = torch.rand(256, 1, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, 2 * x**2 + 0.5)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)
""",
    "mytask/experiment.yaml": """
run:
  name: quadratic
trainer:
  max_epochs: 40
  enable_progress_bar: false
  callbacks+:  # added to the template's list, not replacing it
    - class_path: lightning.pytorch.callbacks.Timer
      init_args:
        duration: "00:01:00:00"  # stop after an hour (its enum default `interval` must survive config.yaml)
model:
  class_path: mytask.model.Quadratic
  init_args:
    optimizer:
      class_path: torch.optim.SGD
      init_args:
        lr: 0.5
data:
  class_path: mytask.data.QuadraticData
""",
}


def test_a_new_model_data_and_experiment_are_three_files_outside_the_package(tmp_path) -> None:
    """What a user writes to train their own task: nothing in lightscale changes. The optimizer is any torch.optim
    class, switched from the command line."""
    from conftest import python_cli

    for name, text in THREE_FILES.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text.lstrip())
    env = {"PYTHONPATH": str(tmp_path)}
    results = {}
    for optimizer in ([], ["--model.optimizer", "torch.optim.RAdam", "--model.optimizer.lr", "0.1"]):
        done = python_cli("fit", "--config", "mytask/experiment.yaml", *optimizer, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        run_dir = max(Path("runs/quadratic").iterdir(), key=lambda p: p.stat().st_mtime)
        checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
        assert {"Timer", "LearningRateMonitor", "RunSummary", "GracefulStop"} <= {
            key.split("{")[0] for key in checkpoint["callbacks"]
        } | {name.split(".")[-1] for name in _callback_names(run_dir)}
        state = checkpoint["state_dict"]
        assert abs(state["a"].item() - 2) < 0.2 and abs(state["b"].item() - 0.5) < 0.1, state  # learned 2x^2 + 0.5
        results[bool(optimizer)] = (checkpoint["optimizer_states"][0], (run_dir / "config.yaml").read_text())
    (sgd_state, sgd_config), (radam_state, radam_config) = results[False], results[True]
    assert "torch.optim.SGD" in sgd_config and "torch.optim.RAdam" in radam_config
    assert not sgd_state["state"] and "exp_avg_sq" in radam_state["state"][0]  # really RAdam's state


def _callback_names(run_dir: Path) -> list[str]:
    """class_paths of the callbacks a run had: the user's (trainer.callbacks) and the template's (run.callbacks)."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    entries = (config["trainer"].get("callbacks") or []) + (config["run"].get("callbacks") or [])
    return [entry["class_path"] for entry in entries]
