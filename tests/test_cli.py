"""The command line: config layering, overrides, every shipped YAML, linked arguments, print_config."""

from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, REPO, run_cli
from lightscale.cli import LightscaleCLI


class ParseOnlyCLI(LightscaleCLI):
    """Parses (and validates) the config exactly as ``lightscale`` does, but builds nothing."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    """Parse ``lightscale fit ARGS`` (``run=False`` CLIs take no subcommand)."""
    assert args[0] == "fit"
    return ParseOnlyCLI(args=list(args[1:]), run=False).config


EXPERIMENTS = sorted((CONFIGS / "experiment").glob("*.yaml"))
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "experiment")


def test_configs_exist() -> None:
    assert EXPERIMENTS and PRESETS


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_parses(experiment: Path) -> None:
    config = parse("fit", "--config", str(experiment))
    assert config.model.class_path and config.data.class_path


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_layers_on_every_experiment(preset: Path) -> None:
    """Presets are orthogonal to experiments: any experiment runs under any preset without edits."""
    for experiment in EXPERIMENTS:
        parse("fit", "--config", str(experiment), "--config", str(preset))


def test_later_configs_and_overrides_win(tmp_path: Path) -> None:
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text("trainer: {max_epochs: 3, log_every_n_steps: 7}\nmodel: {init_args: {lr: 0.1}}\n")
    second.write_text("trainer: {max_epochs: 5}\n")
    digits = str(CONFIGS / "experiment" / "digits.yaml")
    config = parse("fit", "--config", digits, "--config", str(first), "--config", str(second), "--model.lr", "0.02")
    assert config.trainer.max_epochs == 5  # second file wins
    assert config.trainer.log_every_n_steps == 7  # untouched keys survive the merge
    assert config.model.init_args.lr == 0.02  # command line wins over files
    assert config.model.class_path == "lightscale.models.Classifier"  # the experiment's model kept


def test_template_defaults() -> None:
    config = parse("fit", "--config", str(CONFIGS / "experiment" / "digits.yaml"))
    assert config.checkpoint.monitor == "val/loss" and config.checkpoint.save_last
    assert config.seed_everything == 42
    assert [logger.class_path.rsplit(".", 1)[-1] for logger in config.trainer.logger] == ["WandbLogger", "CSVLogger"]


def test_a_missing_model_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("fit") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "fit.model" in line and "configs/experiment/digits.yaml" in line


def test_print_config_shows_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(
        "fit", "--config", str(CONFIGS / "experiment" / "digits.yaml"), "--model.lr", "0.005", "--print_config"
    )
    assert code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["init_args"]["lr"] == 0.005
    assert resolved["run"]["name"] == "digits"
    assert resolved["trainer"]["max_epochs"] == 30
    assert not Path("runs").exists()  # printing the config creates no run


def test_num_classes_is_linked_from_data_to_model() -> None:
    digits = str(CONFIGS / "experiment" / "digits.yaml")
    cli = LightscaleCLI(args=["--config", digits, "--data.batch_size", "32", "--trainer.logger", "false"], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 10
    assert cli.model.net.head[-1].out_features == 10


def test_readme_opens_with_the_two_setup_commands() -> None:
    readme = (REPO / "README.md").read_text()
    first_block = readme.split("```", 2)[1]
    assert "make train" in first_block and "make test" in first_block
