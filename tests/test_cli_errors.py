"""Bad input on the command line: one line naming the key / file / value, exit code 2, nothing created."""

from pathlib import Path

import pytest

from conftest import CONFIGS, python_cli, run_cli

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")


def write(path: str, text: str) -> str:
    Path(path).write_text(text)
    return path


CASES = {
    "unknown key in a config file": (
        lambda: ["--config", write("bad.yaml", "trainer:\n  max_epochz: 3\n")],
        "trainer.max_epochz",
    ),
    "unknown command-line key": (lambda: ["--trainer.bogus", "1"], "--trainer.bogus"),
    "unknown model argument": (lambda: ["--model.init_args.bogus", "3"], "bogus"),
    "wrong value type": (lambda: ["--trainer.max_epochs", "abc"], "trainer.max_epochs"),
    "wrong type in a file": (
        lambda: ["--config", write("lr.yaml", "model:\n  init_args:\n    lr: fast\n")],
        "model.lr",
    ),
    "missing config file": (lambda: ["--config", "nope.yaml"], "nope.yaml"),
    "class_path that does not import": (lambda: ["--model", "nowhere.Model"], "nowhere.Model"),
    "negative learning rate": (lambda: ["--model.lr", "-0.1"], "model.lr"),
    "batch size 0": (lambda: ["--data.batch_size", "0"], "data.batch_size"),
    "impossible split": (lambda: ["--data.val_fraction", "0.6", "--data.test_fraction", "0.5"], "val_fraction"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_gives_one_line_and_creates_nothing(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    make_args, named = CASES[case]
    code = run_cli("fit", "--config", DIGITS, *make_args())
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lightscale: error: "), err
    assert named in err[0]
    assert "Traceback" not in err[0]
    assert not Path("runs").exists()


def test_an_existing_run_directory_is_never_reused_silently(capsys: pytest.CaptureFixture[str]) -> None:
    run = Path("runs/old/1")
    run.mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    assert run_cli("fit", "--config", DIGITS, "--run.dir", str(run)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == "{}" and len(list(run.iterdir())) == 1


def test_the_installed_command_exits_non_zero_with_one_line() -> None:
    result = python_cli("fit", "--config", DIGITS, "--model.lr", "-1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lightscale: error: model.lr: Not of type PositiveFloat: -1 does not conform to restriction v>0"
    ]
