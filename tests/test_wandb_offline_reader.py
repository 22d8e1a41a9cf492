"""The offline-run reader must return exactly what a real wandb 0.31 offline run logged.

Later tests use it to prove that metrics and config reached W&B, so it is checked here against a real
``wandb.init(mode="offline")`` run whose records span many 32 KiB blocks (and one record spans several).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers.wandb_offline import (
    BLOCK_SIZE,
    FIRST,
    LAST,
    MIDDLE,
    CorruptWandbFileError,
    find_offline_runs,
    iter_chunks,
    read_offline_run,
)

N_STEPS = 300
BIG_STEP = 150  # this step logs a string longer than three blocks


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every file wandb writes (run dir, settings, cache) in tmp_path; stay offline and silent."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _row(i: int) -> dict:
    text = f"step-{i}-" + "abcdefghij" * 60  # ~600 chars: history+summary ~1.3 KB per step
    if i == BIG_STEP:
        text = "Z" * (3 * BLOCK_SIZE + 1234)
    return {
        "train/loss": 1.0 / (i + 3),
        "train/acc": math.sqrt(i) / 17.0,
        "epoch": i // 100,
        "flag": i % 2 == 0,
        "text": text,
        "nested": {"a": i * 0.1, "b": {"c": -i}},
    }


@pytest.fixture
def offline_run(wandb_env: Path) -> tuple[Path, dict]:
    import wandb

    config = {
        "model": {"class_path": "lightscale.models.CausalLM", "init_args": {"lr": 3e-4, "layers": [4, 4]}},
        "data": {"batch_size": 12, "name": "shakespeare"},
        "seed": 1234,
        "long": "L" * 5000,
    }
    run = wandb.init(
        mode="offline",
        dir=wandb_env,
        project="lightscale-test",
        name="reader-check",
        config=config,
        tags=["unit", "offline"],
        group="grp-1",
        job_type="train",
        notes="written by test_wandb_offline_reader",
    )
    run_id = run.id
    run.config.update({"trainer": {"max_steps": N_STEPS}})
    for i in range(N_STEPS):
        run.log(_row(i))
    run.summary["best/val_loss"] = 0.125
    run.summary["final"] = {"ok": True, "n": N_STEPS}
    run.finish()
    expected = {"run_id": run_id, "config": {**config, "trainer": {"max_steps": N_STEPS}}}
    return wandb_env, expected


def test_reader_returns_exactly_what_was_logged(offline_run: tuple[Path, dict]) -> None:
    root, expected = offline_run
    runs = find_offline_runs(root)
    assert len(runs) == 1
    assert runs[0].name.endswith(expected["run_id"])

    # The file really exercises the block framing: many blocks, and a record split FIRST/MIDDLE.../LAST.
    run = read_offline_run(runs[0])
    assert run.wandb_file.stat().st_size > 10 * BLOCK_SIZE
    chunk_types = [c.type for c in iter_chunks(run.wandb_file)]
    assert chunk_types.count(FIRST) >= 2 and MIDDLE in chunk_types and LAST in chunk_types

    assert run.run_id == expected["run_id"]
    assert run.project == "lightscale-test"
    assert run.name == "reader-check"
    assert run.tags == ["unit", "offline"]
    assert run.group == "grp-1"
    assert run.job_type == "train"
    assert run.notes == "written by test_wandb_offline_reader"
    assert run.exit_code == 0
    assert run.config == expected["config"]  # nested, incl. the later config.update, no "_wandb"

    assert len(run.history) == N_STEPS
    for i, row in enumerate(run.history):
        assert row["_step"] == i
        user = {k: v for k, v in row.items() if not k.startswith("_")}
        assert user == _row(i), f"history row {i} differs"
    assert run.metric("train/loss") == [(i, 1.0 / (i + 3)) for i in range(N_STEPS)]

    last = _row(N_STEPS - 1)
    assert {k: v for k, v in run.summary.items() if not k.startswith("_")} == {
        **last,
        "best/val_loss": 0.125,
        "final": {"ok": True, "n": N_STEPS},
    }
    assert run.summary["_step"] == N_STEPS - 1
    assert "_wandb" not in run.summary and "runtime" in run.summary_wandb
    assert "requirements.txt" in run.files


def test_reader_rejects_corruption(offline_run: tuple[Path, dict]) -> None:
    root, _ = offline_run
    wandb_file = read_offline_run(find_offline_runs(root)[0]).wandb_file
    data = bytearray(wandb_file.read_bytes())

    chunks = [c for c in iter_chunks(wandb_file) if len(c.payload) > 200]
    victim = chunks[len(chunks) // 2]
    flipped = bytearray(data)
    flipped[victim.offset + 7 + len(victim.payload) // 2] ^= 0xFF
    wandb_file.write_bytes(bytes(flipped))
    with pytest.raises(CorruptWandbFileError, match="crc mismatch"):
        read_offline_run(wandb_file)

    # A run killed mid-write: strict reading refuses, tolerant reading keeps every complete record.
    wandb_file.write_bytes(bytes(data[: victim.offset + 7 + len(victim.payload) // 2]))
    with pytest.raises(CorruptWandbFileError, match="truncated"):
        read_offline_run(wandb_file)
    partial = read_offline_run(wandb_file, allow_truncated_tail=True)
    assert 0 < len(partial.history) < N_STEPS
    assert all(row["text"] == _row(i)["text"] for i, row in enumerate(partial.history))
    assert partial.exit_code is None

    wandb_file.write_bytes(b"NOTW&B!" + bytes(data[7:]))
    with pytest.raises(CorruptWandbFileError, match="bad header"):
        read_offline_run(wandb_file)
