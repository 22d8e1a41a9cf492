"""The default experiment, end to end: accuracy floor, run directory, metrics, checkpoints, W&B files."""

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import CONFIGS, run_cli, run_dirs
from helpers.wandb_offline import find_offline_runs, read_offline_run
from lightscale.data import DigitsDataModule
from lightscale.models import Classifier

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short run of the default experiment, shared by the tests below (it is the expensive part)."""
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("digits"))
    try:
        assert run_cli("fit", "--config", DIGITS, "--trainer.max_epochs", "8", *QUIET) == 0
        (run_dir,) = run_dirs()
        return run_dir.resolve()
    finally:
        os.chdir(cwd)


def test_default_experiment_reaches_the_accuracy_floor(trained_run: Path) -> None:
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["test_metrics"]["test/acc"] >= 0.98
    assert summary["fit_metrics"]["val/acc"] >= 0.97
    assert summary["epochs"] == 8 and summary["global_step"] == 8 * 10  # 1259 train images / 128 per batch
    assert summary["train_samples_per_sec"] > 0
    assert summary["best"]["monitor"] == "val/loss"


def test_run_directory_holds_config_checkpoints_and_logs(trained_run: Path) -> None:
    assert trained_run.parent.name == "digits"
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "summary.json", "metrics.csv", "checkpoints", "wandb"} <= names
    checkpoints = {p.name for p in (trained_run / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(name.startswith("best-") for name in checkpoints)
    assert not list(trained_run.rglob("lightning_logs"))  # nothing escapes into Lightning's default dirs


def test_wandb_offline_run_holds_metrics_and_nested_config(trained_run: Path) -> None:
    (offline,) = find_offline_runs(trained_run)
    run = read_offline_run(offline)
    assert run.config["model"]["init_args"]["lr"] == 0.003
    assert run.config["trainer"]["max_epochs"] == 8
    assert run.config["data"]["class_path"] == "lightscale.data.DigitsDataModule"
    train_losses = [row["train/loss"] for row in run.history if "train/loss" in row]
    assert len(train_losses) == 8 * 10 // 10  # every log_every_n_steps=10 steps
    val_acc = [row["val/acc"] for row in run.history if "val/acc" in row]
    assert len(val_acc) == 8
    assert run.summary["test/acc"] >= 0.98
    assert (trained_run / "wandb-run-id").read_text().strip() == run.run_id


def test_checkpoint_reload_gives_identical_predictions(trained_run: Path) -> None:
    data = DigitsDataModule()
    data.setup()
    images, _ = data.splits["test"].tensors
    (best,) = (trained_run / "checkpoints").glob("best-*.ckpt")
    first = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    second = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    with torch.no_grad():
        logits = first(images)
        assert torch.equal(logits, second(images))
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in first.state_dict().items())


def test_metrics_match_a_hand_computation() -> None:
    """torchmetrics accuracy / macro-F1 as logged equal the textbook formulas on the same predictions."""
    L.seed_everything(0)
    data = DigitsDataModule(batch_size=50)
    model = Classifier(channels=(8,), dropout=0.0)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.test(model, datamodule=data, verbose=False)
    images, labels = data.splits["test"].tensors
    with torch.no_grad():
        predicted = model.eval()(images).argmax(-1).numpy()
    truth = labels.numpy()
    accuracy = float(np.mean(predicted == truth))
    f1s = []
    for c in range(10):
        tp = np.sum((predicted == c) & (truth == c))
        fp = np.sum((predicted == c) & (truth != c))
        fn = np.sum((predicted != c) & (truth == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    assert logged["test/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert logged["test/f1"] == pytest.approx(float(np.mean(f1s)), abs=1e-6)


def test_split_is_deterministic_and_normalised_on_train_only() -> None:
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["val"].tensors[0], b.splits["val"].tensors[0])
    assert not torch.equal(a.splits["val"].tensors[1], c.splits["val"].tensors[1])
    train = a.splits["train"].tensors[0]
    assert train.mean().abs() < 1e-5 and (train.std() - 1).abs() < 1e-4  # train stats only
    sizes = {name: len(split) for name, split in a.splits.items()}
    assert sizes == {"train": 1259, "val": 270, "test": 268} or sum(sizes.values()) == 1797
