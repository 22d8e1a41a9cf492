"""The W&B API key comes only from the environment (or ~/.netrc): it never lands in anything a run writes, and a
config that carries a credential is refused."""

from pathlib import Path

import pytest

from conftest import CONFIGS, run_cli, run_dirs

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
FAKE_KEY = "lsfake0123456789abcdef0123456789abcdef42"  # 40 characters, like a W&B key
SHORT = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def files_containing(root: Path, secret: str) -> list[Path]:
    needle = secret.encode()
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_the_api_key_never_reaches_the_files_of_a_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")  # the W&B logger is on (the default logger list), offline
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--checkpoint.last_every_n_steps", "1") == 0
    assert len(run_dirs()) == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.name for p in written} | {p.suffix for p in written}
    # the run really wrote what could leak: config, summary, metrics, checkpoints, W&B's own run and logs
    assert {"config.yaml", "summary.json", "metrics.csv", "last.ckpt", ".wandb", ".log"} <= kinds, kinds
    assert files_containing(tmp_path, FAKE_KEY) == []
    assert files_containing(tmp_path, FAKE_KEY[:20]) == []  # not even a prefix


@pytest.mark.parametrize(
    "args",
    [
        ["--run.name", FAKE_KEY],  # the key's value anywhere in the config
        ["--trainer.logger+=lightscale.loggers.WandbLogger", "--trainer.logger.init_args.notes", f"key {FAKE_KEY}"],
    ],
    ids=["as a value", "inside a value"],
)
def test_a_config_holding_the_key_is_refused(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert run_cli("fit", "--config", DIGITS, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs are saved with the run, so they must not hold credentials" in err[0], err
    assert FAKE_KEY not in err[0]
    assert not Path("runs").exists()


def test_a_secret_looking_config_key_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    config = Path("c.yaml")
    config.write_text(
        "trainer:\n  logger:\n    - class_path: lightscale.loggers.WandbLogger\n"
        "      dict_kwargs:\n        api_key: abc123\n"  # extra keyword arguments pass jsonargparse unchecked
    )
    assert run_cli("fit", "--config", DIGITS, "--config", str(config)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lightscale: error: trainer.logger[0].dict_kwargs.api_key: configs are saved with the run, so they must not "
        "hold credentials; set WANDB_API_KEY in the environment or run `wandb login` (stored in ~/.netrc) instead"
    )
    assert not Path("runs").exists()
