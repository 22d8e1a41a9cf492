"""Sweeps as SLURM job arrays: a grid or list of overrides in YAML, or a W&B sweep's agent, one point per task.

A sweep file::

    name: digits-lr                 # W&B group prefix (default: the file name)
    grid:                           # every combination, in file order
      model.init_args.lr: [0.001, 0.003, 0.01]
      data.init_args.batch_size: [32, 64]
    points:                         # and/or an explicit list (each combined with every grid combination)
      - {trainer.max_epochs: 5}

``slurm/sweep.sbatch`` runs, in each array task, one of::

    python -m lightscale.cluster.sweep grid FILE INDEX -- srun lightscale fit --config C ... {} --trainer.devices T
    python -m lightscale.cluster.sweep agent ENTITY/PROJECT/SWEEP_ID -- srun lightscale fit --config C ... {} ...

``{}`` marks where the point's overrides go (``--model.init_args.lr=0.003``: LightningCLI syntax), before the
arguments that must win (SLURM's node and task counts). Each point gets its own run directory (the job's,
see :mod:`lightscale.cluster.slurm`) and W&B run, all in the W&B group ``<name>-<array job id>``.

``agent`` runs ``wandb agent --count 1``; the W&B sweep's ``command`` must call back
``python -m lightscale.cluster.sweep run ${args}`` (see ``slurm/sweeps/wandb-digits.yaml``): that hands the agent's
``--key=value`` arguments to the template command, so the values reach the LightningCLI config, and stores
the agent's run id as the run's W&B id. A requeued task (``SLURM_RESTART_COUNT`` >= 1) does not ask the
agent again: it repeats its recorded point and resumes the same run directory and W&B run.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightscale.core.errors import UserError
from lightscale.core.run_dir import RUN_DIR_ENV, WANDB_RUN_ID_FILE, new_run_dir

PLACEHOLDER = "{}"
TEMPLATE_ENV = "LIGHTSCALE_SWEEP_TEMPLATE"  # the command template, JSON, for the agent's `run` callback


# ------------------------------------------------------------------------------------------ sweep files
def load_sweep(path: str | Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"sweep file {path}: {error}") from None
    if not isinstance(spec, dict) or not ({"grid", "points"} & set(spec)):
        raise UserError(f"sweep file {path}: needs a `grid:` mapping and/or a `points:` list")
    unknown = set(spec) - {"name", "grid", "points"}
    if unknown:
        raise UserError(f"sweep file {path}: unknown key(s) {sorted(unknown)} (expected name, grid, points)")
    return spec


def load_points(path: str | Path) -> list[dict[str, Any]]:
    """Every point of a sweep file, in a fixed order: index ``i`` is array task ``i``."""
    spec = load_sweep(path)
    grid = spec.get("grid") or {}
    points = spec.get("points") or [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"sweep file {path}: every `grid` entry must be a non-empty list of values")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise UserError(f"sweep file {path}: `points` must be a list of mappings")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    return [{**point, **combo} for point in points for combo in combos]


def sweep_name(path: str | Path) -> str:
    return str(load_sweep(path).get("name") or Path(path).stem)


def format_value(value: Any) -> str:
    """A value as the command line writes it (jsonargparse reads it back as YAML)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def point_args(point: dict[str, Any]) -> list[str]:
    """``{"model.init_args.lr": 0.003}`` -> ``["--model.init_args.lr=0.003"]``."""
    return [f"--{key.removeprefix('--')}={format_value(value)}" for key, value in point.items()]


# -------------------------------------------------------------------------------------------- launching
def _record(key: str) -> Path:
    from lightscale.cluster.slurm import RECORD_DIR

    return Path(os.environ.get("SLURM_SUBMIT_DIR") or Path.cwd()) / RECORD_DIR / f"{key}.point.json"


def _fill(template: Sequence[str], args: Sequence[str]) -> list[str]:
    if PLACEHOLDER not in template:
        return [*template, *args]
    i = list(template).index(PLACEHOLDER)
    return [*template[:i], *args, *template[i + 1 :]]


def launch(template: Sequence[str], args: Sequence[str], group: str | None = None) -> None:
    """Run one point: choose (or, after a requeue, reuse) its run directory and W&B id, then exec the command.

    Under SLURM the point's arguments are recorded on the first start and reused on restarts, whatever
    ``args`` says (a requeued agent task is not given a new point).
    """
    from lightscale.cluster.slurm import job_key, job_run_dir, note_start, restart_count

    if not template:
        raise UserError("no command to run the sweep point with (expected: ... -- lightscale fit ... {} ...)")
    args = list(args)
    key = job_key()
    wandb_id = os.environ.get("WANDB_RUN_ID")
    if key is not None:
        record = _record(key)
        if restart_count() > 0 and record.is_file():
            saved = json.loads(record.read_text())
            args, wandb_id, group = saved["args"], saved.get("wandb_run_id"), saved.get("group")
        else:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"args": args, "wandb_run_id": wandb_id, "group": group}) + "\n")
    command = _fill(template, args)
    fit_args = command[command.index("fit") + 1 :] if "fit" in command else command
    if key is not None:
        run_dir = job_run_dir(fit_args)
        note_start(run_dir)
    else:
        from lightscale.cluster.slurm import run_location

        root, name, explicit = run_location(fit_args)
        run_dir = Path(explicit) if explicit else new_run_dir(root, name)
        run_dir.mkdir(parents=True, exist_ok=True)
    if wandb_id and not (run_dir / WANDB_RUN_ID_FILE).is_file():
        (run_dir / WANDB_RUN_ID_FILE).write_text(f"{wandb_id}\n")  # the agent's run: the W&B sweep sees this run
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if group:
        os.environ.setdefault("WANDB_RUN_GROUP", group)
    print(f"lightscale sweep: {' '.join(args) or '(no overrides)'} -> {run_dir}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execvp(command[0], command)


def _split_template(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def _group(prefix: str) -> str:
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    return f"{prefix}-{job}" if job else prefix


USAGE = """usage:
  python -m lightscale.cluster.sweep count FILE                       number of points
  python -m lightscale.cluster.sweep point FILE INDEX                 the overrides of one point, one per line
  python -m lightscale.cluster.sweep grid FILE INDEX -- COMMAND...    run point INDEX ({} in COMMAND marks its place)
  python -m lightscale.cluster.sweep agent SWEEP_ID -- COMMAND...     one point from `wandb agent --count 1`
  python -m lightscale.cluster.sweep run [ARGS...]                    (the W&B sweep's command) run the agent's point"""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, template = _split_template(argv) if argv[:1] != ["run"] else (argv, [])
    try:
        if own[:1] == ["count"] and len(own) == 2:
            print(len(load_points(own[1])))
        elif own[:1] == ["point"] and len(own) == 3:
            points = load_points(own[1])
            index = int(own[2])
            if not 0 <= index < len(points):
                raise UserError(f"sweep {own[1]} has {len(points)} points; index {index} is out of range")
            print("\n".join(point_args(points[index])))
        elif own[:1] == ["grid"] and len(own) == 3:
            points = load_points(own[1])
            index = int(own[2])
            if not 0 <= index < len(points):
                raise UserError(
                    f"sweep {own[1]} has {len(points)} points but this is array task {index}: "
                    f"submit with --array=0-{len(points) - 1}"
                )
            group = os.environ.get("WANDB_RUN_GROUP") or _group(sweep_name(own[1]))
            launch(template, point_args(points[index]), group=group)
        elif own[:1] == ["agent"] and len(own) == 2:
            from lightscale.cluster.slurm import job_key, restart_count

            key = job_key()
            group = os.environ.get("WANDB_RUN_GROUP") or _group("wandb-sweep")
            if key is not None and restart_count() > 0 and _record(key).is_file():
                launch(template, [], group=group)  # requeued: same point, no new one from the agent
            os.environ[TEMPLATE_ENV] = json.dumps(template)
            os.environ.setdefault("WANDB_RUN_GROUP", group)
            command = ["wandb", "agent", "--count", "1", own[1]]
            os.execvp(command[0], command)
        elif own[:1] == ["run"]:
            template = json.loads(os.environ.get(TEMPLATE_ENV) or "[]") or ["lightscale", "fit"]
            launch(template, own[1:], group=os.environ.get("WANDB_RUN_GROUP"))
        else:
            print(USAGE, file=sys.stderr)
            sys.exit(2)
    except (UserError, ValueError, OSError) as error:
        print(f"lightscale sweep: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
