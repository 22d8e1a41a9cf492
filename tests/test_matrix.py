"""Every experiment under every preset really runs: fit, then validate, test and predict on the checkpoint that fit
wrote, then a new fit from the run's own saved ``config.yaml``.

Presets are discovered from ``configs/{trainer,logger,debug}``, so a new preset cannot land untested. Presets that
cannot run on this machine (no GPU, no W&B account) must be refused in one line, with nothing created. Sizes are
tiny (a config layered between the experiment and the preset, so the preset's own settings win). The default suite
runs the digits experiment under every in-process preset and every experiment alone; the rest of the cross product
(other experiments, and the multi-process ddp / fsdp / tp / fsdp-tp / hsdp presets) is in the slow suite.
``make matrix`` runs all of it and prints the table (``pytest_terminal_summary`` in conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, MATRIX, python_cli, run_cli, run_dirs, without_logging_noise

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
PRESET_FILES = sorted(p for kind in ("trainer", "logger", "debug") for p in (CONFIGS / kind).glob("*.yaml"))
PRESETS = ["(none)", *(f"{p.parent.name}/{p.stem}" for p in PRESET_FILES)]
# no CUDA device here, no W&B account: these must fail at once, in one line, creating nothing
REFUSED_ON_CPU = {"trainer/gpu": "no CUDA GPU is visible", "logger/wandb-online": "W&B online mode needs an API key"}
# a model without a tensor-parallel plan (the digits Classifier) is refused by every process at the start of fit
REFUSED_FOR = {("digits", p): "applies no tensor-parallel plan" for p in ("trainer/tp", "trainer/fsdp-tp")}
# several processes: Lightning's launcher re-runs the command, so they run as `python -m lightscale` (2 CPU ranks)
MULTI_PROCESS = {
    "trainer/ddp": ["--trainer.accelerator", "cpu", "--trainer.devices", "2"],
    "trainer/fsdp": ["--trainer.accelerator", "cpu"],
    "trainer/tp": ["--trainer.accelerator", "cpu"],
}
# 4 processes: more than this machine's cores, which the CLI refuses to launch itself, so torchrun starts them (as a
# cluster would). HSDP's two "nodes" become two shard groups of 2 on one node.
TORCHRUN = {
    "trainer/fsdp-tp": ["--trainer.accelerator", "cpu"],
    "trainer/hsdp": ["--trainer.accelerator", "cpu", "--trainer.num_nodes", "1", "--trainer.devices", "4",
                     "--trainer.strategy.init_args.shard_size", "2"],
}  # fmt: skip
MULTI_PROCESS.update(TORCHRUN)
# The tensor-parallel and HSDP presets run digits and one GPT experiment: the GPT experiments differ only in sizes,
# which tiny_config overrides, so each further one would cost 2-4 minutes of 2-4 processes on 2 cores (measured)
# for no new coverage. Their numerical equivalence with one process is tests/test_parallel_layouts.py.
LAYOUT_PRESETS = {"trainer/tp", *TORCHRUN}
LAYOUT_EXPERIMENTS = {"digits", "gpt-cpu"}
# digits under HSDP shards like digits under fsdp (cell trainer/fsdp), at 4 minutes of 4 processes on 2 cores
LAYOUT_SKIPPED = {("digits", "trainer/hsdp")}
DEFAULT_SUITE = {("digits", p) for p in PRESETS if p not in MULTI_PROCESS} | {(e, "(none)") for e in EXPERIMENTS}
SUBCOMMANDS = ("fit", "validate", "test", "predict", "refit")


def experiment_kind(experiment: str) -> str:
    config = yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text())
    return "gpt" if "CausalLM" in config["model"]["class_path"] else "digits"


def tiny_config(experiment: str, workdir: Path) -> Path:
    """Sizes that make any experiment train in seconds, on data that exists on every machine."""
    trainer = {"log_every_n_steps": 1, "limit_val_batches": 2, "limit_predict_batches": 2}
    if experiment_kind(experiment) == "digits":  # one short epoch, validated at its end
        config = {"trainer": {**trainer, "max_epochs": 1, "limit_train_batches": 4, "limit_test_batches": 2}}
        config["data"] = {"init_args": {"batch_size": 32}}
    else:
        corpus = workdir / "corpus.txt"  # real text: a slice of the standard library's own source
        if not corpus.exists():
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            corpus.write_text("".join((stdlib / name).read_text() for name in ("textwrap.py", "shlex.py")))
        data = yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text())["data"]["init_args"]
        # gpt2 BPE needs tiktoken's download once; bytes keep the test offline
        offline_tokenizer = "byte" if data.get("tokenizer") == "gpt2" else data.get("tokenizer", "byte")
        config = {
            "trainer": {**trainer, "max_steps": 4, "val_check_interval": 2},
            "model": {"init_args": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32, "compile": False,
                                    "max_new_tokens": 4,
                                    "scheduler": {"init_args": {"warmup_steps": 1}}}},
            "data": {"init_args": {"path": str(corpus), "block_size": 32, "batch_size": 4, "val_batches": 2,
                                   "train_samples_per_epoch": 64, "cache_dir": str(workdir / "tokens"),
                                   "val_fraction": 0.1, "num_workers": 0, "tokenizer": offline_tokenizer,
                                   "prompts": ["def ", "import ", "class ", "return "]}},  # one per process
        }  # fmt: skip
    path = workdir / f"tiny-{experiment}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_error_line(stderr: str, processes: int = 1) -> str:
    """The one error line (printed by each of up to ``processes`` processes when they all refuse: the first one to
    exit may end the others before they print)."""
    lines = without_logging_noise(stderr)
    errors = [line for line in lines if line.startswith("lightscale: error: ")]
    assert 1 <= len(errors) <= processes and len(set(errors)) == 1, stderr[-3000:]
    assert lines[-1] == errors[0] and "Traceback" not in "".join(lines), stderr[-3000:]
    return errors[0]


class Cell:
    """One experiment x preset: runs each subcommand the way a user would and records its outcome."""

    def __init__(self, experiment: str, preset: str, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.experiment, self.preset, self.capsys = experiment, preset, capsys
        self.multi = MULTI_PROCESS.get(preset)
        self.base = [
            "--config",
            str(CONFIGS / "experiment" / f"{experiment}.yaml"),
            "--config",
            str(tiny_config(experiment, workdir)),
        ]
        if preset != "(none)":
            self.base += ["--config", str(CONFIGS / f"{preset}.yaml")]
        self.outcome: dict[str, str] = {}
        MATRIX[(experiment, preset)] = self.outcome

    def run(self, *args: str) -> tuple[int, str]:
        """``lightscale ARGS``: in this process, or as separate processes for multi-process presets."""
        if self.preset in TORCHRUN:
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
            result = subprocess.run(
                [*torchrun, "-m", "lightscale", *args, *self.multi], capture_output=True, text=True, timeout=600
            )
            if result.returncode == 0:
                return 0, result.stderr
            # torchrun exits 1 and appends its own report (with its own traceback): judge the ranks' output, and
            # the exit code of the rank that failed first
            ranks = re.split(
                r"^[WE]\d{4} [\d:.]+ \d+ torch/distributed/elastic/", result.stderr, maxsplit=1, flags=re.M
            )[0]
            root_cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", result.stderr, re.S)
            return (int(root_cause.group(1)) if root_cause else result.returncode), ranks
        if self.multi is not None:
            result = python_cli(*args, *self.multi, timeout=600)
            return result.returncode, result.stderr
        self.capsys.readouterr()
        code = run_cli(*args)
        return code, self.capsys.readouterr().err

    def new_run(self, before: list[Path]) -> Path:
        (run_dir,) = [p for p in run_dirs() if p not in before]
        return run_dir

    def command(self, name: str, *args: str) -> Path:
        before = run_dirs()
        code, stderr = self.run(*args)
        assert code == 0, f"{name}: exit {code}\n{stderr[-4000:]}"
        run_dir = self.new_run(before)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "finished", summary
        self.outcome[name] = "passed"
        return run_dir


def run_cell(cell: Cell) -> None:
    experiment, preset = cell.experiment, cell.preset
    if preset in REFUSED_ON_CPU:
        code, stderr = cell.run("fit", *cell.base)
        assert code == 2 and REFUSED_ON_CPU[preset] in one_error_line(stderr)
        assert not run_dirs()
        cell.outcome.update({name: "refused (one line)" for name in SUBCOMMANDS})
        return
    if (experiment_kind(experiment), preset) in REFUSED_FOR:
        code, stderr = cell.run("fit", *cell.base)
        processes = 4 if preset in TORCHRUN else 2
        assert code == 2 and REFUSED_FOR[experiment_kind(experiment), preset] in one_error_line(stderr, processes)
        assert not run_dirs()
        cell.outcome.update({name: "refused: no tensor-parallel plan (one line per process)" for name in SUBCOMMANDS})
        return

    fit_dir = cell.command("fit", "fit", *cell.base)
    summary = json.loads((fit_dir / "summary.json").read_text())
    fast_dev_run = preset == "debug/fast_dev_run"
    if fast_dev_run:  # one batch of each loop, and by design neither checkpoints nor a saved config
        assert summary["global_step"] == 1 and not (fit_dir / "checkpoints").exists()
        source = [*cell.base]
    else:
        assert summary["global_step"] > 0 and (fit_dir / "config.yaml").is_file()
        last = fit_dir / "checkpoints" / "last.ckpt"
        assert last.exists(), list(fit_dir.rglob("*"))
        source = ["--config", str(fit_dir / "config.yaml"), "--ckpt_path", str(last)]

    run_dir = cell.command("validate", "validate", *source)
    metrics = json.loads((run_dir / "summary.json").read_text())["validate_metrics"]
    assert "val/loss" in metrics, metrics

    has_test_split = experiment_kind(experiment) == "digits"
    if has_test_split:
        run_dir = cell.command("test", "test", *source)
        assert "test/loss" in json.loads((run_dir / "summary.json").read_text())["test_metrics"]
    else:
        before = run_dirs()
        code, stderr = cell.run("test", *source)
        assert code == 2 and "has no test split" in one_error_line(stderr, 4 if preset in TORCHRUN else 1)
        assert run_dirs() == before
        cell.outcome["test"] = "refused: no test split (one line)"

    run_dir = cell.command("predict", "predict", *source)
    files = sorted(run_dir.glob("predictions*.jsonl"))
    rows = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert rows, f"no predictions in {run_dir}"
    key = "label" if experiment_kind(experiment) == "digits" else "text"
    assert all(key in row for row in rows), rows[:3]

    if fast_dev_run:
        cell.outcome["refit"] = "n/a: fast_dev_run saves no config"
    else:
        cell.command("refit", "fit", "--config", str(fit_dir / "config.yaml"))


CELLS = [
    pytest.param(e, p, id=f"{e}-{p}", marks=() if (e, p) in DEFAULT_SUITE else pytest.mark.slow)
    for e in EXPERIMENTS
    for p in PRESETS
    if (p not in LAYOUT_PRESETS or e in LAYOUT_EXPERIMENTS) and (e, p) not in LAYOUT_SKIPPED
]


@pytest.mark.parametrize(("experiment", "preset"), CELLS)
def test_preset_really_runs(
    experiment: str, preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no stored W&B key either
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    run_cell(Cell(experiment, preset, tmp_path, capsys))
