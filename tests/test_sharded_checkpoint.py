"""Sharded checkpoints (FSDP2 under ``lightscale.training.strategy.ModelParallelStrategy``) are swapped in whole: a
kill while one is being written, in the foreground or in the background (``checkpoint.async_save``), leaves the
previous checkpoint to resume from, and the resumed run ends where an uninterrupted one ends."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS
from helpers.resume import metrics_history, start, wait
from lightscale.core.files import remove_stale_temporaries
from lightscale.resilience.checkpoint_io import vet_sharded
from lightscale.resilience.sharded_checkpoint import publish, recover_interrupted_swaps

GPT = [
    "fit", "--config", str(CONFIGS / "experiment" / "gpt-cpu.yaml"), "--config", str(CONFIGS / "logger" / "csv.yaml"),
    "--config", str(CONFIGS / "trainer" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
    "--run.test_after_fit", "false", "--run.report", "false", "--trainer.enable_progress_bar", "false",
    "--data.max_bytes", "100000", "--data.block_size", "32", "--data.batch_size", "4",
    "--data.train_samples_per_epoch", "96", "--data.val_batches", "2", "--model.block_size", "32",
    "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.sample_prompt", "null",
    "--model.scheduler.warmup_steps", "2", "--trainer.max_steps", "12", "--trainer.val_check_interval", "6",
    "--trainer.deterministic", "true", "--checkpoint.last_every_n_steps", "2",
]  # fmt: skip


def folder_checkpoint(path: Path, step: int) -> None:
    path.mkdir(parents=True)
    (path / "meta.pt").write_text(str(step))


def test_a_swap_that_a_kill_interrupted_is_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the two renames of a swap the name is free and the old folder is aside: it is put back, and the
    new folder, incomplete as far as anyone knows, is removed as a temporary."""
    last, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.abcd.tmp"
    folder_checkpoint(last, 4)
    folder_checkpoint(staging, 6)
    real_rename = Path.rename

    def killed_before_the_second_rename(self: Path, target: Path) -> Path:
        if self == staging:
            raise KeyboardInterrupt  # stands for the kill
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        publish(staging, last)
    monkeypatch.undo()
    assert not last.exists() and len(list(tmp_path.glob(".last.ckpt.*.old"))) == 1
    assert recover_interrupted_swaps(tmp_path) == [last]
    assert remove_stale_temporaries(tmp_path) == [staging]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (last / "meta.pt").read_text() == "4"
    # a whole swap replaces the folder and leaves nothing beside it
    folder_checkpoint(staging, 8)
    publish(staging, last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"] and (last / "meta.pt").read_text() == "8"


def events(log: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in log.read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half-written
        return []


def hanging_write_config(path: Path, log: Path, from_write: int) -> str:
    callback = {"class_path": "helpers.faults.HangingShardedWrite", "init_args": {"events": str(log)}}
    callback["init_args"]["from_write"] = from_write
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": [callback]}}))
    return str(path)


def consolidated(checkpoint: Path, out: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", ["false", "true"])
def test_a_kill_during_a_sharded_save_keeps_the_previous_checkpoint(tmp_path: Path, async_save: str) -> None:
    args = [*GPT, "--data.cache_dir", str(tmp_path / "tokens"), "--checkpoint.async_save", async_save]
    reference = start([*args, "--run.dir", str(tmp_path / "ref")], tmp_path / "ref.log")
    wait(reference, tmp_path / "ref.log")
    log = tmp_path / "events.jsonl"
    config = hanging_write_config(tmp_path / "hang.yaml", log, from_write=2)  # the 2nd save never completes
    killed = start([*args, "--config", config, "--run.dir", str(tmp_path / "res")], tmp_path / "killed.log")
    deadline = time.monotonic() + 300

    def ready() -> bool:
        seen = events(log)
        started = [i for i, e in enumerate(seen) if e["event"] == "write-start"]
        if async_save == "false":
            return bool(started)
        return bool(started) and any(e["event"] == "step" for e in seen[started[0] :])  # training went on

    while not ready():
        assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # every rank at once, as a node failure would
    killed.wait()

    checkpoints = tmp_path / "res" / "checkpoints"
    meta = vet_sharded(checkpoints / "last.ckpt")  # whole: every entry the metadata names is there
    assert meta["global_step"] == 2  # the first save; the second never completed
    assert [p for p in checkpoints.glob(".last.ckpt.*.tmp") if not (p / ".metadata").exists()]
    resumed = start([*args, "--run.dir", str(tmp_path / "res"), "--ckpt_path", "auto"], tmp_path / "res.log")
    wait(resumed, tmp_path / "res.log")
    assert "resuming from" in (tmp_path / "res.log").read_text()
    ref = consolidated(tmp_path / "ref" / "checkpoints" / "last.ckpt", tmp_path / "ref.pt")
    res = consolidated(checkpoints / "last.ckpt", tmp_path / "res.pt")
    assert ref["state_dict"].keys() == res["state_dict"].keys()
    for name, tensor in ref["state_dict"].items():
        assert torch.equal(tensor, res["state_dict"][name]), name
    assert metrics_history(tmp_path / "res") == metrics_history(tmp_path / "ref")
    assert not list(checkpoints.glob(".*.tmp")) and not list(checkpoints.glob(".*.old"))
