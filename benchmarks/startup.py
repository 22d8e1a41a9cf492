"""Start-up: wall time of ``lightscale --help`` and ``lightscale fit --print_config`` against
``python -c "import lightning.pytorch"``, which every Lightning program pays (~6 s on a 2-core CPU).

What the template adds on top (its own imports, building the CLI's parsers, validating the defaults) is what
this measures. The commands run as fresh processes, interleaved, ``--repeats`` times; the table has the median
of each and its ratio to the import. A last check confirms that wandb is not imported just to print a config.

    .venv/bin/python benchmarks/startup.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, base_parser, finish, machine, median, quiet_env, row

BENCH = "startup"
TARGET = 1.3
DIGITS = str(REPO / "configs" / "experiment" / "digits.yaml")
BASELINE = ("import lightning.pytorch", ["-c", "import lightning.pytorch"])
COMMANDS = [
    ("lightscale --help", ["-m", "lightscale", "--help"]),
    ("lightscale fit --print_config", ["-m", "lightscale", "fit", "--print_config"]),
    (
        "lightscale fit --config digits.yaml --print_config",
        ["-m", "lightscale", "fit", "--config", DIGITS, "--print_config"],
    ),
]
PROBE = (
    "import sys, warnings; warnings.filterwarnings('ignore'); from lightscale.cli import LightscaleCLI\n"
    "try:\n    LightscaleCLI(args=['fit', '--config', {config!r}, '--print_config'])\nexcept SystemExit:\n    pass\n"
    "print('WANDB_IMPORTED' if 'wandb' in sys.modules else 'WANDB_NOT_IMPORTED', file=sys.stderr)"
)


def timed(args: list[str], cwd: str) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=quiet_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{args} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="runs of each command (default 5; quick: 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    times: dict[str, list[float]] = {name: [] for name, _ in [BASELINE, *COMMANDS]}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as cwd:
        timed(list(BASELINE[1]), cwd)  # warm the file cache once; not counted
        for r in range(repeats):
            for name, command in [BASELINE, *COMMANDS]:
                times[name].append(timed(list(command), cwd))
            print(
                f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True
            )
        probe = subprocess.run(
            [sys.executable, "-c", PROBE.format(config=DIGITS)],
            cwd=cwd,
            env=quiet_env(),
            capture_output=True,
            text=True,
        )
    base = median(times[BASELINE[0]])
    rows = [row(BENCH, BASELINE[0], "wall time", base, "s", note=f"median of {repeats} fresh processes")]
    for name, _ in COMMANDS:
        t = median(times[name])
        rows.append(row(BENCH, name, "wall time", t, "s", note=f"+{t - base:.2f} s over the import"))
        rows.append(row(BENCH, name, "ratio to the import", t / base, "x", f"<= {TARGET}", t / base <= TARGET))
    imported = "WANDB_IMPORTED" in probe.stderr
    rows.append(
        row(
            BENCH,
            "fit --print_config",
            "imports wandb",
            "yes" if imported else "no",
            target="no",
            ok=not imported and "WANDB_NOT_IMPORTED" in probe.stderr,
            note="wandb (~2 s) is imported when the W&B run starts",
        )
    )
    return finish(rows, args.json, {"machine": machine(), "times": times})


if __name__ == "__main__":
    sys.exit(main())
