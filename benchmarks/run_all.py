"""Run every benchmark and print one table (``make bench``); also writes benchmarks/results.json and results.md.

Each benchmark runs as its own process (fresh imports, no state shared between them) and hands its rows back
as JSON. GPU rows say "skipped: no CUDA device" on a machine without one. The figures are only as quiet as
the machine: the load average before and after is printed with the table; rerun when it was above ~1 per core.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only overhead,startup] [--skip nanogpt]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, machine, quiet_env, row, table

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["startup", "overhead", "overhead_breakdown", "data_path", "checkpoint_save", "scaling", "gpu", "nanogpt"]
TEMPLATE_CASE = "nanoGPT CPU Shakespeare recipe, template"
REFERENCE_CASE = "same recipe, nanoGPT's loop (plain PyTorch)"


def run_json(name: str, extra: list[str], quick: bool) -> tuple[list[dict[str, Any]], float]:
    """Run ``benchmarks/<name>.py`` and return its rows (a failed run becomes one FAIL row)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out), *extra]
        if quick:
            command.append("--quick")
        start = time.perf_counter()
        result = subprocess.run(
            command, cwd=REPO, env=quiet_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        seconds = time.perf_counter() - start
        progress = [line for line in result.stdout.splitlines() if line.startswith("  ")]
        print("\n".join(progress), flush=True)
        if out.exists():
            return json.loads(out.read_text())["rows"], seconds
    tail = " | ".join(result.stdout.strip().splitlines()[-3:])[-300:]
    return [row(name, "-", "benchmark run", "error", ok=False, note=f"exit {result.returncode}: {tail}")], seconds


def run_quality(script: str, case: str, target: str) -> tuple[list[dict[str, Any]], float]:
    """A quality run (nanogpt_shakespeare.py: the template; nanogpt_reference.py: nanoGPT's loop in plain
    PyTorch), parsed from its one summary line: the 20-batch val loss and the whole-split val loss."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(HERE / script)],
        cwd=REPO,
        env=quiet_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seconds = time.perf_counter() - start
    lines = result.stdout.strip().splitlines()
    skip = next((line for line in lines if line.startswith("skipped")), None)
    if skip is not None:
        return [row("quality", case, "val loss, 20 batches", None, target=target, note=skip)], seconds
    summary = next((line for line in lines if line.startswith(script.removesuffix(".py") + ":")), "")
    val, whole = re.search(r"val loss ([0-9.]+)", summary), re.search(r"whole val split: ([0-9.]+)", summary)
    if val is None or whole is None:
        note = f"exit {result.returncode}: " + " | ".join(lines[-2:])[-200:]
        return [row("quality", case, "benchmark run", "error", ok=False, note=note)], seconds
    timing = re.search(r"fit [0-9]+ s \([0-9]+ ms/step\)", summary)
    ok = (float(val.group(1)) <= float(target.split()[-1])) if target else None
    return [
        row("quality", case, "val loss, 20 batches", float(val.group(1)), target=target, ok=ok,
            note=timing.group(0) if timing else ""),
        row("quality", case, "val loss, whole val split", float(whole.group(1)),
            note="every val character predicted once: far less sampling noise"),
    ], seconds  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the harness, not the speed")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for results.json / results.md")
    args = parser.parse_args()
    chosen = [b for b in BENCHMARKS if (not args.only or b in args.only.split(",")) and b not in args.skip.split(",")]

    info = machine()
    load_before = load_average()
    intro = f"lightscale benchmarks, {info['date']}: {info['cpu']} ({info['cpus_usable']} CPUs usable), "
    print(intro + f"torch {info['torch']}, lightning {info['lightning']}; load average {load_before[0]:.2f}")
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for name in chosen:
        print(f"[{name}]", flush=True)
        if name == "nanogpt":
            if args.quick:
                rows.append(row("quality", TEMPLATE_CASE, "val loss, 20 batches", None, note="skipped: --quick"))
                continue
            new, seconds[name] = run_quality("nanogpt_shakespeare.py", TEMPLATE_CASE, "<= 1.89")
            reference, seconds["nanogpt reference"] = run_quality("nanogpt_reference.py", REFERENCE_CASE, "")
            new += reference
        else:
            new, seconds[name] = run_json(name, [], args.quick)
        rows += new
    load_after = load_average()
    header = (
        f"{info['date']} | {info['cpu']}, {info['cpus_usable']} CPUs | torch {info['torch']}, lightning "
        f"{info['lightning']} | load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
        + (" | --quick (harness check, not figures)" if args.quick else "")
    )
    print()
    print(header)
    print(table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "load_before": load_before, "load_after": load_after, "seconds": seconds, "rows": rows}
    result["quick"] = args.quick
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(f"{header}\n\n{table(rows, markdown=True)}\n")
    failed = [r for r in rows if r["ok"] is False and r["metric"] in ("losses match", "benchmark run")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
