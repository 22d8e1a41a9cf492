"""The benchmark harness in its tiny ``--quick`` mode: the correctness parts only, never timings.

Timed assertions would fail on a busy machine; what must always hold is that both arms of the overhead
benchmark train identically (same losses), that GPU rows are skipped rather than failing without a GPU, and
that ``make bench`` prints a row for every benchmark.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def _run(script: str, *args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_table_marks_skipped_failed_and_passed_rows() -> None:
    from _common import row, skipped, table

    rows = [
        row("overhead", "digits CNN", "step-time ratio template/plain", 1.01, "x", "<= 1.03", True),
        row("overhead", "tiny GPT", "step-time ratio template/plain", 1.2, "x", "<= 1.03", False),
        skipped("gpu", "GPT-124M bf16 + compile", "MFU (dense bf16 peak)"),
    ]
    lines = table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert "PASS" in lines[2] and "1.010" in lines[2]
    assert "FAIL" in lines[3]
    assert "skip" in lines[4] and "skipped: no CUDA device" in lines[4]
    assert table(rows, markdown=True).count("\n") == 1 + len(rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_gpu_benchmark_prints_skipped_rows_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = _run("gpu.py", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["value"] is None and r["note"] == "skipped: no CUDA device" for r in rows)
    assert any(r["metric"].startswith("MFU") for r in rows)


def test_background_checkpoint_benchmark_writes_the_foreground_file(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint_save.json"
    result = _run("checkpoint_save.py", "--quick", "--params", "2000000", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["metric"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["same file as the foreground save"]["value"] == "yes"
    assert rows["loop blocked, async_save"]["value"] > 0


@pytest.mark.slow
def test_overhead_arms_train_identically(tmp_path: Path) -> None:
    """Same init, batches, optimizer and steps: the template and the plain loop give the same losses."""
    out = tmp_path / "overhead.json"
    result = _run("overhead.py", "--case", "digits", "--quick", "--rounds", "1", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {r["metric"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["losses match"]["ok"] is True and rows["losses match"]["value"] == "yes"
    assert rows["step-time ratio template/plain"]["value"] > 0
    assert rows["whole-run ratio template/plain"]["value"] > 0


@pytest.mark.slow
def test_run_all_prints_a_row_for_every_benchmark(tmp_path: Path) -> None:
    result = _run("run_all.py", "--quick", "--out", str(tmp_path), timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    benches = {r["bench"] for r in rows}
    assert {"startup", "overhead", "overhead breakdown", "data path", "scaling", "gpu", "quality"} <= benches
    assert not [r for r in rows if r["metric"] == "benchmark run"]  # no benchmark crashed
    cases = {(r["bench"], r["case"]) for r in rows}
    assert {("overhead", "digits CNN"), ("overhead", "tiny GPT")} <= cases
    assert {("data path", "digits CNN"), ("data path", "tiny GPT")} <= cases
    assert all(r["ok"] for r in rows if r["metric"] == "losses match")
    spent = {r["metric"]: r["value"] for r in rows if r["bench"] == "overhead breakdown"}
    assert spent["template, in NonFiniteGuard"] > 0  # every callback's hooks are timed
    assert "| benchmark |" in (tmp_path / "results.md").read_text()
