"""Any importable LightningModule / DataModule works through the CLI by class_path, with no code change."""

import json

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
