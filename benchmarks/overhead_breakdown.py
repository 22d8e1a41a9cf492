"""Where the template's extra time per step goes: the tiny GPT (configs/experiment/gpt-cpu.yaml) and the digits
experiment with a 2-channel CNN (almost no compute: the fixed cost per step), each under the template, under a
bare ``lightning.Trainer`` and in the plain loop of benchmarks/overhead.py, with the CPU time split by who
spends it.

- main thread: the training loop itself (``time.thread_time`` per step, median); the template's excess over
  the bare Trainer is the template's, the bare Trainer's excess over the plain loop is Lightning's.
- inside each callback and logger: every hook and ``log_metrics`` call wrapped with a CPU-time counter, per
  step over the training steps (validation excluded).
- other threads of the process (W&B's sender threads, loader threads, ...) and child processes (the W&B
  service): their CPU seconds over the whole fit, per training step. On a 2-core machine they take cores the
  training thread could use, which the wall-clock ratio shows and the main thread's CPU time does not.

    .venv/bin/python benchmarks/overhead_breakdown.py [--case gpt|fixed|all] [--steps 80] [--rounds 4]
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, finish, machine, median, row, setup_quiet
from overhead import Arm, build_cli, digits_case, gpt_case, run_bare_trainer, run_template

BENCH = "overhead breakdown"
HOOK_PREFIXES = ("on_", "setup", "teardown", "state_dict", "load_state_dict")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process by ``name:tid`` (from /proc; {} where there is none)."""
    out = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{comm}:{task.name}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def children_cpu() -> float:
    """CPU seconds of this process's descendants: those still running (the W&B service) and those ended."""
    import resource

    ended = resource.getrusage(resource.RUSAGE_CHILDREN)
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    family, total = {os.getpid()}, ended.ru_utime + ended.ru_stime
    for _ in range(4):  # children, grandchildren, ...
        family |= {pid for pid, (parent, _) in stats.items() if parent in family}
    return total + sum(stats[pid][1] for pid in family - {os.getpid()} if pid in stats)


def instrument(cli: Any, spent: dict[str, float], training: list[bool]) -> None:
    """Wrap every hook of every callback, and every logger's ``log_metrics``, with a thread-CPU-time counter
    that counts only while a training step is running (``training[0]``)."""

    def wrap(owner: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if training[0]:
                    spent[owner] += time.thread_time() - start

        return timed

    for callback in cli.trainer.callbacks:
        for name in dir(callback):
            fn = getattr(callback, name, None)
            if name.startswith(HOOK_PREFIXES) and callable(fn):
                setattr(callback, name, wrap(type(callback).__name__, fn))
    for logger in cli.trainer.loggers:
        logger.log_metrics = wrap(type(logger).__name__, logger.log_metrics)


def measure(kind: str, case: Any, cli: Any, init: dict[str, Any], seed: int) -> dict[str, Any]:
    """One arm: per-step medians (wall, main-thread CPU), CPU by callback/logger, other threads, children."""
    import lightning as L

    arm, spent, training = Arm(), defaultdict(float), [False]

    class Marker(L.Callback):  # marks the time spent training (validation excluded) for `instrument`
        def on_train_start(self, *args: Any) -> None:
            training[0] = True

        def on_validation_start(self, *args: Any) -> None:
            training[0] = False

        def on_validation_end(self, trainer: Any, *args: Any) -> None:
            training[0] = not trainer.sanity_checking

        def on_train_end(self, *args: Any) -> None:
            training[0] = False

    threads0, children0 = thread_cpu(), children_cpu()
    if kind == "plain":
        case.plain(cli, init, arm, seed)
    elif kind == "bare":
        cli.model.load_state_dict(init)
        run_bare_trainer(cli, arm, seed)
    else:
        instrument(cli, spent, training)
        cli.trainer.callbacks.append(Marker())
        run_template(cli, arm, seed)
    threads1, children1 = thread_cpu(), children_cpu()
    main_tid = f":{os.getpid()}"
    others = sum(v - threads0.get(k, 0.0) for k, v in threads1.items() if not k.endswith(main_tid))
    steps = max(len(arm.starts), 1)
    return {
        "wall": median(arm.step_times(1)),
        "main_cpu": median(arm.step_times(3)),
        "spent": {k: v / steps for k, v in spent.items()},
        "other_threads": others / steps,
        "children": (children1 - children0) / steps,
        "steps": steps,
    }


def breakdown(case: Any, rounds: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Alternating rounds of the three arms; the rows, and every round's measurements."""
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-breakdown-") as root:
        for r in range(rounds):
            order = ["template", "bare", "plain"] if r % 2 == 0 else ["plain", "bare", "template"]
            init = None
            for kind in order:
                cli = build_cli(case, root, [])
                init = init or copy.deepcopy(cli.model.state_dict())
                cli.model.load_state_dict(init)
                results[kind].append(measure(kind, case, cli, init, seed))
                m = results[kind][-1]
                print(
                    f"  {case.name} round {r + 1} {kind}: step {1e3 * m['wall']:.2f} ms wall, "
                    f"{1e3 * m['main_cpu']:.3f} ms main-thread CPU; other threads {1e3 * m['other_threads']:.2f} "
                    f"ms/step, child processes {1e3 * m['children']:.2f} ms/step",
                    flush=True,
                )

    def med(kind: str, key: str) -> float:
        return median(m[key] for m in results[kind])

    plain, bare, template = (med(k, "main_cpu") for k in ("plain", "bare", "template"))
    name = case.name
    rows = [
        row(BENCH, name, "main-thread CPU per step, plain loop", 1e3 * plain, "ms"),
        row(BENCH, name, "Lightning's loop: bare Trainer - plain", 1e3 * (bare - plain), "ms", note="main thread"),
        row(BENCH, name, "the template: template - bare Trainer", 1e3 * (template - bare), "ms", note="main thread"),
    ]
    owners = sorted({k for m in results["template"] for k in m["spent"]})
    spent = {k: median(m["spent"].get(k, 0.0) for m in results["template"]) for k in owners}
    for owner, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        rows.append(row(BENCH, name, f"template, in {owner}", 1e3 * seconds, "ms", note="its hooks, per step"))
    for kind in ("template", "bare", "plain"):
        rows.append(row(BENCH, name, f"other threads, {kind}", 1e3 * med(kind, "other_threads"), "ms",
                        note="CPU per training step, whole fit"))  # fmt: skip
    rows.append(row(BENCH, name, "child processes (W&B service), template", 1e3 * med("template", "children"),
                    "ms", note="CPU per training step, whole fit"))  # fmt: skip
    for kind in ("template", "bare", "plain"):
        rows.append(row(BENCH, name, f"wall time per step, {kind}", 1e3 * med(kind, "wall"), "ms"))
    return rows, dict(results)


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["gpt", "fixed", "all"], default="all")
    parser.add_argument("--steps", type=int, default=80, help="GPT steps per arm")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    setup_quiet()
    import torch

    torch.set_num_threads(1)
    cases = []
    if args.case in ("fixed", "all"):  # what every step costs whatever the model: digits with a 2-channel CNN
        fixed = digits_case(args.quick)
        fixed.name = "fixed cost (2-channel CNN)"
        fixed.overrides = ["--trainer.max_epochs", "2" if args.quick else "20", "--model.init_args.channels", "[2]"]
        cases.append(fixed)
    if args.case in ("gpt", "all"):
        gpt = gpt_case(args.quick)
        steps = 20 if args.quick else args.steps
        gpt.overrides = ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps // 2)]
        cases.append(gpt)
    rows, details = [], {}
    for case in cases:
        case_rows, details[case.name] = breakdown(case, 1 if args.quick else args.rounds, args.seed)
        rows += case_rows
    return finish(rows, args.json, {"machine": machine(), "rounds": details})


if __name__ == "__main__":
    sys.exit(main())
