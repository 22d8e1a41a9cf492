"""Hardening: no code runs from a checkpoint on any loading path, no non-finite weights are saved, run directories
are owned by one run and never shared or escaped, a full disk and hostile inputs are one line."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, python_cli, run_cli, run_dirs, without_logging_noise

DIGITS = str(CONFIGS / "experiment" / "digits.yaml")
CSV = str(CONFIGS / "logger" / "csv.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SHORT = ["--config", CSV, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
         "--trainer.limit_val_batches", "1", "--run.report", "false", "--run.test_after_fit", "false",
         *QUIET]  # fmt: skip


class Payload:
    """What an attacker puts into a file that is unpickled: code that leaves ``marker`` behind when it runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def error_line(stderr: str) -> str:
    lines = without_logging_noise(stderr)
    errors = [line for line in lines if line.startswith("lightscale: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and not any("Traceback" in x for x in lines), lines
    return errors[0]


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A Lightning-looking checkpoint whose pickle carries a payload."""
    torch.save({"state_dict": {}, "loops": {}, "evil": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("finished"))
    try:
        assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", "runs/done") == 0
        return Path("runs/done").resolve()
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------------------- sharded checkpoints
def sharded_checkpoint(folder: Path, source: Path) -> Path:
    """A torch.distributed.checkpoint folder as ModelParallelStrategy writes it (weights and optimizer in shards,
    the rest in meta.pt), made from a real checkpoint of the digits run."""
    import torch.distributed.checkpoint as dcp

    checkpoint = torch.load(source, weights_only=True)
    state = {"state_dict": checkpoint.pop("state_dict"), "optimizer_0": checkpoint.pop("optimizer_states")[0]}
    dcp.save(state, checkpoint_id=str(folder))
    torch.save(checkpoint, folder / "meta.pt")
    return folder


def test_a_sharded_checkpoint_is_vetted_without_running_it(finished_run: Path, tmp_path: Path) -> None:
    from lightscale.resilience.checkpoint_io import CheckpointError, vet_sharded

    marker = tmp_path / "ran"
    folder = sharded_checkpoint(tmp_path / "good", finished_run / "checkpoints" / "last.ckpt")
    assert vet_sharded(folder)["global_step"] == 3  # a real sharded folder passes

    # 1. torch.distributed.checkpoint reads .metadata with plain pickle.load
    evil_index = sharded_checkpoint(tmp_path / "evil-index", finished_run / "checkpoints" / "last.ckpt")
    (evil_index / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"contains the pickled object 'builtins.exec'"):
        vet_sharded(evil_index)

    # 2. ... and every non-tensor entry (optimizer settings) with torch.load(weights_only=False)
    evil_entry = sharded_checkpoint(tmp_path / "evil-entry", finished_run / "checkpoints" / "last.ckpt")
    with open(evil_entry / ".metadata", "rb") as file:
        metadata = pickle.load(file)
    key = next(k for k in metadata.storage_data if k.fqn == "optimizer_0.param_groups.0.lr")
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    (evil_entry / "evil.distcp").write_bytes(payload.getvalue())
    info = metadata.storage_data[key]
    metadata.storage_data[key] = type(info)("evil.distcp", 0, len(payload.getvalue()), info.transform_descriptors)
    with open(evil_entry / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    with pytest.raises(CheckpointError, match=r"evil.distcp \(entry optimizer_0.param_groups.0.lr\)"):
        vet_sharded(evil_entry)

    # 3. an index that points outside its folder
    metadata.storage_data[key] = type(info)("../../outside", 0, 10, None)
    with open(evil_entry / ".metadata", "wb") as file:
        pickle.dump(metadata, file)
    with pytest.raises(CheckpointError, match="points outside its folder"):
        vet_sharded(evil_entry)
    assert not marker.exists()


def test_no_loading_path_runs_a_crafted_checkpoint(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Explicit file, explicit sharded folder, auto (file and folder), last, hpc: refused or skipped, never run."""
    marker = tmp_path / "ran"
    sharded = sharded_checkpoint(tmp_path / "sharded", finished_run / "checkpoints" / "last.ckpt")
    (sharded / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    evil_file = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    for ckpt in (evil_file, sharded):
        for command in ("fit", "validate", "test", "predict"):
            assert run_cli(command, "--config", DIGITS, *SHORT, "--ckpt_path", str(ckpt)) == 2
            assert "refused to load checkpoint" in error_line(capsys.readouterr().err)
    assert not run_dirs()

    for mode, place in (
        ("auto", "checkpoints/last.ckpt"),
        ("last", "checkpoints/last.ckpt"),
        ("hpc", "hpc_ckpt_1.ckpt"),
    ):
        for crafted in (evil_file, sharded):
            run_dir = Path(f"runs/{mode}-{crafted.name}")
            (run_dir / place).parent.mkdir(parents=True, exist_ok=True)
            os.system(f"cp -r {crafted} {run_dir / place}")
            assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", str(run_dir), "--ckpt_path", mode) == 0
            err = capsys.readouterr().err
            assert "skipping refused to load checkpoint" in err and "starting from scratch" in err, err
    assert not marker.exists()


def test_weights_only_false_means_the_same_on_every_path(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The explicit opt-out loads with full pickle (running what it holds) whether the checkpoint is named or found
    by hpc/auto; without it, neither runs anything."""
    good = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    for name, how in (("explicit", "file"), ("hpc", "hpc")):
        marker = tmp_path / f"ran-{name}"
        crafted = {**good, "extra": Payload(marker)}
        run_dir = Path(f"runs/{name}")
        run_dir.mkdir(parents=True)
        path = run_dir / "hpc_ckpt_1.ckpt"
        torch.save(crafted, path)
        ckpt = str(path) if how == "file" else "hpc"
        args = ["fit", "--config", DIGITS, *SHORT, "--run.dir", str(run_dir), "--ckpt_path", ckpt]
        assert run_cli(*args, "--weights_only", "false") == 0
        assert marker.read_text() == "ran", name  # the opt-out is honoured, on both paths
        assert "--weights_only false" in capsys.readouterr().err or how == "hpc"


def test_a_requeued_slurm_job_starts_fresh_past_damaged_hpc_checkpoints(tmp_path: Path) -> None:
    """Lightning's own SLURM lookup would load the highest hpc_ckpt_N.ckpt unopened (and fail, or run code)."""
    marker = tmp_path / "ran"
    for damaged in ("truncated", "crafted"):
        run_dir = tmp_path / damaged
        run_dir.mkdir()
        if damaged == "truncated":
            (run_dir / "hpc_ckpt_3.ckpt").write_bytes(b"PK\x03\x04 not a whole zip")
        else:
            malicious_checkpoint(run_dir / "hpc_ckpt_3.ckpt", marker)
        env = {"SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "1", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train",
               "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
               "LIGHTSCALE_RUN_DIR": str(run_dir)}  # fmt: skip
        result = python_cli("fit", "--config", DIGITS, *SHORT, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 3  # trained from scratch
        assert (run_dir / "invalid-hpc-ckpt-3.ckpt").is_file() and not (run_dir / "hpc_ckpt_3.ckpt").exists()
    assert not marker.exists()


# ---------------------------------------------------------------------------------------- non-finite weights
def all_checkpoint_tensors_finite(run_dir: Path) -> int:
    count = 0
    for path in run_dir.rglob("*.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        tensors = [t for t in checkpoint["state_dict"].values() if t.is_floating_point()]
        for state in checkpoint.get("optimizer_states", []):
            tensors += [
                t for s in state["state"].values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()
            ]
        assert all(bool(torch.isfinite(t).all()) for t in tensors), path
        count += 1
    return count


@pytest.mark.parametrize(
    "extra",
    [
        ["--checkpoint.last_every_n_steps", "1"],
        ["--trainer.limit_train_batches", "1", "--trainer.max_epochs", "3"],
        ["--nonfinite.action", "skip", "--checkpoint.last_every_n_steps", "1"],
        ["--nonfinite.action", "skip", "--trainer.limit_train_batches", "1", "--trainer.max_epochs", "3"],
    ],
    ids=["stop, last every step", "stop, 1 batch per epoch", "skip, last every step", "skip, 1 batch per epoch"],
)
def test_a_step_that_makes_the_weights_non_finite_is_never_checkpointed(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # The fused AdamW computes the step in tensors, so lr 1e38 makes the weights overflow to inf in one step.
    args = ["fit", "--config", DIGITS, *SHORT, "--trainer.max_epochs", "2", "--model.lr", "1e38",
            "--model.optimizer.init_args.fused", "true", "--model.scheduler", "null",
            "--run.dir", "runs/diverged", *extra]  # fmt: skip
    assert run_cli(*args) == 2
    error = error_line(capsys.readouterr().err)
    assert "non-finite" in error, error
    run_dir = Path("runs/diverged")
    if run_dir.exists():
        all_checkpoint_tensors_finite(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed" and "best" not in summary


def test_a_non_finite_validation_score_is_never_the_best(tmp_path: Path) -> None:
    from lightscale.callbacks import Checkpoint

    checkpoint = Checkpoint(dirpath=tmp_path, monitor="val/loss", save_top_k=1)

    class Trainer:
        global_step = 4

    with pytest.warns(UserWarning, match="not a candidate for the best checkpoint"):
        checkpoint._save_topk_checkpoint(Trainer(), {"val/loss": torch.tensor(float("inf"))})
    assert checkpoint.best_model_path == ""


# -------------------------------------------------------------------------------------- run directories
def test_a_second_run_in_the_same_process_gets_its_own_directory() -> None:
    assert run_cli("fit", "--config", DIGITS, *SHORT) == 0
    assert "LIGHTSCALE_RUN_DIR" not in os.environ
    assert run_cli("fit", "--config", DIGITS, *SHORT) == 0
    first, second = run_dirs()
    assert first != second
    for run_dir in (first, second):
        assert json.loads((run_dir / "summary.json").read_text())["starts"] == 1


def test_an_inherited_run_directory_is_not_trained_into_without_resuming(
    finished_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_bad_input import snapshot

    os.system(f"cp -r {finished_run} runs_done")
    before = snapshot(Path("runs_done"))
    monkeypatch.setenv("LIGHTSCALE_RUN_DIR", str(Path("runs_done").resolve()))
    assert run_cli("fit", "--config", DIGITS, *SHORT) == 2
    assert "already holds a run" in error_line(capsys.readouterr().err)
    assert snapshot(Path("runs_done")) == before


def test_a_second_writer_of_one_run_directory_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    from lightscale.core.run_dir import RunLock

    run_dir = Path("runs/shared")
    lock = RunLock(run_dir)
    lock.acquire()  # a run that is in there right now
    try:
        for extra in ([], ["--ckpt_path", "auto"]):
            assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", str(run_dir), *extra) == 2
            assert "is in use by another run" in error_line(capsys.readouterr().err)
    finally:
        lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.dir", str(run_dir)) == 0  # free again


def test_a_lock_left_by_a_killed_run_is_not_stale(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from lightscale.core.run_dir import RunLock
            RunLock({str(tmp_path / "run")!r}).acquire()
            print("locked", flush=True)
            time.sleep(600)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    from lightscale.core.errors import UserError
    from lightscale.core.run_dir import RunLock

    with pytest.raises(UserError, match="in use by another run"):
        RunLock(tmp_path / "run").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = RunLock(tmp_path / "run")
    lock.acquire()  # the kernel released it with the process
    lock.release()


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/absolute", "a/../../b", "."])
def test_run_names_stay_inside_the_run_root(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("fit", "--config", DIGITS, *SHORT, "--run.name", name) == 2
    assert f"run.name {name!r}" in error_line(capsys.readouterr().err)
    assert not run_dirs() and not Path("escaped").exists() and not Path("../escaped").exists()


# ------------------------------------------------------------------------------------------- disk full
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path: Path, async_save: str
) -> None:
    """A real full disk: a 1.8 MB tmpfs holds the first checkpoint of a digits run (best-*.ckpt, 1.1 MB) and the
    run's small files, but not the next one (last.ckpt, written as a temporary beside it). A background write
    (``checkpoint.async_save``) fails the same way, one save later."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1800k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the RLIMIT_FSIZE test covers the path")
    try:
        result = python_cli("fit", "--config", DIGITS, "--config", CSV, "--run.dir", str(mount / "run"),
                            "--trainer.max_epochs", "5", "--run.min_free_gb", "0", *QUIET,
                            "--checkpoint.async_save", async_save)  # fmt: skip
        assert result.returncode == 2
        error = error_line(result.stderr)
        assert "could not write checkpoint" in error and "No space left on device" in error, error
        assert "the previous checkpoint is intact" in error
        checkpoints = list((mount / "run" / "checkpoints").glob("*.ckpt"))
        assert checkpoints and all(torch.load(p, weights_only=True)["global_step"] > 0 for p in checkpoints)
        assert not list((mount / "run" / "checkpoints").glob(".*.tmp"))
        assert json.loads((mount / "run" / "summary.json").read_text())["status"] == "failed"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_write_that_fails_inside_torch_save_is_one_line(tmp_path: Path) -> None:
    """torch's zip writer reports a failed write as '[enforce fail at inline_container.cc] unexpected pos';
    RLIMIT_FSIZE makes every checkpoint file fail that way (EFBIG), wherever the test runs."""
    code = textwrap.dedent(f"""
        import resource, runpy, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        sys.argv = ["lightscale", "fit", "--config", {DIGITS!r}, "--config", {CSV!r}, "--trainer.max_epochs", "1"]
        runpy.run_module("lightscale", run_name="__main__")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "could not write checkpoint" in error_line(result.stderr) and "File too large" in result.stderr
    assert not list(Path("runs").rglob("*.ckpt*"))  # no partial file, and no stray run directory either
    assert not run_dirs()


# --------------------------------------------------------------------------------- hostile or broken input
def test_a_billion_laughs_config_is_refused_at_once() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    Path("laughs.yaml").write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    result = python_cli("fit", "--config", DIGITS, "--config", "laughs.yaml", timeout=120)
    assert result.returncode == 2
    assert "expand into more than 100,000 values" in error_line(result.stderr)
    assert time.monotonic() - start < 60 and not Path("runs").exists()


@pytest.mark.parametrize("option", ["--config", "--ckpt_path"])
def test_a_pipe_is_refused_instead_of_read_forever(option: str) -> None:
    os.mkfifo("pipe")
    result = python_cli("fit", "--config", DIGITS, option, "pipe", timeout=120)
    assert result.returncode == 2
    assert "not a regular file" in error_line(result.stderr)
    assert not Path("runs").exists()


def test_bad_checkpoints_and_settings_are_one_line_with_no_stray_run(
    finished_run: Path, tmp_path: Path, capsys
) -> None:
    checkpoint = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save(checkpoint["state_dict"], "bare.pt")
    without_loops = {k: v for k, v in checkpoint.items() if k != "loops"}
    torch.save(without_loops, "no-loops.ckpt")
    foreign = {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "_class_path": "mypkg.OtherModel"}}
    torch.save(foreign, "foreign.ckpt")
    Path("init.yaml").write_text(
        "trainer:\n  logger:\n    - class_path: lightscale.loggers.WandbLogger\n      init_args:\n"
        "        init_kwargs: {not_a_wandb_argument: 1}\n"
    )
    cases = {
        "bare.pt": (["--ckpt_path", "bare.pt"], "is a bare state_dict (weights only), not a Lightning checkpoint"),
        "no-loops": (["--ckpt_path", "no-loops.ckpt"], "cannot resume training: it has no loops"),
        "foreign": (["--ckpt_path", "foreign.ckpt"], "was written by mypkg.OtherModel, but the config trains"),
        "wandb": (["--config", "init.yaml"], "wandb.init() takes no argument not_a_wandb_argument"),
    }
    for name, (args, expected) in cases.items():
        assert run_cli("fit", "--config", DIGITS, *args) == 2, name
        assert expected in error_line(capsys.readouterr().err), name
    assert not Path("runs").exists()


@pytest.mark.parametrize("key", ["token", "hf_token", "aws_secret_access_key", "private_key", "db_password"])
def test_credentials_in_a_config_are_refused(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    Path("secret.yaml").write_text(f"data:\n  init_args:\n    {key}: abcdefgh12345678\n")
    args = [
        "--model",
        "external_models.LineFit",
        "--data",
        "external_models.LineDataFromHub",
        "--config",
        "secret.yaml",
    ]
    assert run_cli("fit", *args) == 2
    assert f"data.init_args.{key}: configs are saved with the run, so they must not hold credentials" in error_line(
        capsys.readouterr().err
    )
    assert not Path("runs").exists()


def test_a_key_stored_by_wandb_login_is_refused_wherever_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef0123456789abcdef01234567\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert run_cli("fit", "--config", DIGITS, "--run.name", "x0123456789abcdef0123456789abcdef01234567") == 2
    assert "must not hold credentials" in error_line(capsys.readouterr().err)
    from lightscale.cli.checks import check_no_secrets

    check_no_secrets({"data": {"init_args": {"pad_token": "<pad>", "eos_token": "</s>"}}})  # tokenizer words pass


def test_the_token_cache_follows_the_content_not_the_timestamp(tmp_path: Path) -> None:
    from lightscale.data.text import TextDataModule

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh" * 500)
    first = TextDataModule(path=str(corpus), tokenizer="char", block_size=8, cache_dir=str(tmp_path / "c"))
    first.prepare_data()
    stat = corpus.stat()
    corpus.write_text("hgfedcba" * 500)  # same size, other content
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old modification time
    second = TextDataModule(path=str(corpus), tokenizer="char", block_size=8, cache_dir=str(tmp_path / "c"))
    second.prepare_data()
    assert second.shard_dir != first.shard_dir
    second.setup("fit")
    assert second.tokenizer.decode(second.train_set[0][:2].numpy()) in ("hg", "gf", "fe", "ed", "dc", "cb", "ba", "ah")
    moved = tmp_path / "elsewhere.txt"
    moved.write_text("abcdefgh" * 500)  # the first content, another file: the same shards
    third = TextDataModule(path=str(moved), tokenizer="char", block_size=8, cache_dir=str(tmp_path / "c"))
    assert third.shard_dir == first.shard_dir
