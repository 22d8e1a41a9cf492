"""Bad input beyond the config file (which ``test_cli_errors.py`` covers): data, environment and checkpoints.

Each case: one line on stderr naming what is wrong and what to do, exit code 2, and no run directory created
(or, for a resume, the existing run and its checkpoints left byte-for-byte as they were).
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, python_cli, run_cli, without_logging_noise

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
GPT = str(CONFIGS / "experiment" / "gpt-cpu.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
SHORT += ["--run.test_after_fit", "false", "--run.report", "false", "--config", CSV, *QUIET]


def write(path: str, data: str | bytes) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def gpt(*args: str) -> list[str]:
    return ["--config", GPT, "--data.cache_dir", "tokens", "--model.n_layer", "1", "--model.n_embd", "16", *args]


CASES = {
    # data
    "missing data path": (lambda: gpt("--data.path", "no/such/dir"), "no/such/dir"),
    "empty corpus": (lambda: gpt("--data.path", write("corpus/empty.txt", "")), "is empty"),
    "undecodable bytes": (
        lambda: gpt("--data.path", write("bad.txt", b"ok\n\xff\xfe\x00broken"), "--data.tokenizer", "char"),
        "not valid UTF-8",
    ),
    "corpus shorter than a block": (
        lambda: gpt("--data.path", write("tiny.txt", "hello world\n" * 3), *SHORT),
        "fewer than block_size + 1",
    ),
    "float64 images from a user's dataset": (
        lambda: ["--config", DIGITS, "--data", "helpers.faults.Float64Digits", *SHORT],
        "Classifier.validation_step failed on the first batch",
    ),
    "labels outside the model's classes": (
        lambda: ["--config", DIGITS, "--data", "helpers.faults.BadLabelDigits", *SHORT],
        "out of bounds",
    ),
    # environment
    "more devices than exist": (
        lambda: ["--config", DIGITS, "--trainer.accelerator", "cpu", "--trainer.devices", "64"],
        "trainer.devices=64",
    ),
    "a GPU on a machine without one": (lambda: ["--config", DIGITS, "--trainer.accelerator", "gpu"], "no CUDA GPU"),
    "GPU-only precision on the CPU": (
        lambda: ["--config", DIGITS, "--trainer.accelerator", "cpu", "--trainer.precision", "16-mixed"],
        "trainer.precision=16-mixed is for CUDA GPUs",
    ),
    "output directory that cannot be created": (
        lambda: ["--config", DIGITS, "--run.root", str(Path(write("blocker", "a file")) / "runs")],
        "blocker is a file, not a directory",
    ),
    "not enough free disk space": (lambda: ["--config", DIGITS, "--run.min_free_gb", "1e9"], "run.min_free_gb=1e+09"),
}


def the_error(stderr: str) -> str:
    """The one ``lightscale: error:`` line (informational log lines such as 'Seed set to 42' may precede it)."""
    lines = without_logging_noise(stderr)
    errors = [line for line in lines if line.startswith("lightscale: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0]


# these fail in the first step, after the run directory was created (and are reported before any checkpoint)
FAIL_IN_FIRST_STEP = ("float64 images from a user's dataset", "labels outside the model's classes")


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_creates_no_run(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    make_args, named = CASES[case]
    code = run_cli("fit", *make_args())
    error = the_error(capsys.readouterr().err)
    assert code == 2
    assert named in error, error
    if case in FAIL_IN_FIRST_STEP:
        assert not list(Path("runs").rglob("*.ckpt"))
    elif case != "corpus shorter than a block":
        assert not Path("runs").exists()


def test_unwritable_output_directory(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere; covered by the 'cannot be created' case")
    Path("locked").mkdir(mode=0o500)
    assert run_cli("fit", "--config", DIGITS, "--run.root", "locked/runs") == 2
    assert "is not writable" in the_error(capsys.readouterr().err)


# ------------------------------------------------------------------------------------ checkpoints of another model
def snapshot(run_dir: Path) -> dict[str, str]:
    files = (p for p in run_dir.rglob("*") if p.is_file())
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short digits run with checkpoints, copied into each test that needs it."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("digits"))
    try:
        assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", "runs/done") == 0
        return Path("runs/done").resolve()
    finally:
        os.chdir(cwd)


def test_environment_errors_are_exactly_one_line_from_the_command() -> None:
    result = python_cli("fit", "--config", DIGITS, "--trainer.accelerator", "cpu", "--trainer.precision", "16-true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "lightscale: error: trainer.precision=16-true is for CUDA GPUs (float16 / FP8 kernels), but this run uses "
        "the CPU: use --trainer.precision bf16-mixed or 32-true"
    ]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--model.channels", "[16, 32]"], "shapes differ (checkpoint vs model): net.features.0.weight (32, 1, 3, 3)"),
        (["--model.channels", "[32, 64, 64]"], "missing keys: net.features.14.weight"),
        (gpt("--data.max_bytes", "20000"), "was written by lightscale.models.Classifier, but the config trains"),
    ],
    ids=["different sizes", "different depth", "different model"],
)
def test_resuming_with_another_architecture_is_refused_and_leaves_the_run(
    finished_run: Path, args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(finished_run, "runs/done")
    before = snapshot(Path("runs/done"))
    base = args if args[0] == "--config" else ["--config", DIGITS, *args]
    assert run_cli("fit", *base, *SHORT, "--run.dir", "runs/done", "--ckpt_path", "auto") == 2
    error = the_error(capsys.readouterr().err)
    assert error.startswith("lightscale: error: checkpoint runs/done/checkpoints/last.ckpt") and named in error
    assert snapshot(Path("runs/done")) == before


def test_a_checkpoint_with_missing_weights_is_refused(finished_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["state_dict"]["net.head.3.weight"]
    torch.save(checkpoint, "partial.ckpt")
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--ckpt_path", "partial.ckpt") == 2
    assert "missing keys: net.head.3.weight" in the_error(capsys.readouterr().err)
