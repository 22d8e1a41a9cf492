"""``lightscale COMMAND ...`` (also ``python -m lightscale``): one table of what there is to run.

=========================================  ============================================================
command                                    what it does
=========================================  ============================================================
``fit | validate | test | predict``        train / evaluate / predict with a LightningModule and data
``report [RUN_DIR ...]``                   report.md and plots of a run (the newest), or a comparison
``preflight --config ... [--sbatch ...]``  check a SLURM job before it queues (no GPU needed)
``sync [--watch] [RUN_DIR ...]``           upload offline W&B runs, also while they run (login node)
``export RUN_DIR_OR_CKPT [--out DIR]``      one-file checkpoint + safetensors + architecture, loadable anywhere
=========================================  ============================================================
"""

import importlib
import sys

COMMANDS = {
    "fit": "lightscale.cli.main",
    "validate": "lightscale.cli.main",
    "test": "lightscale.cli.main",
    "predict": "lightscale.cli.main",
    "report": "lightscale.report.command",
    "preflight": "lightscale.cli.preflight",
    "sync": "lightscale.tracking.sync",
    "export": "lightscale.resilience.export",
}
ARGUMENTS_ARE_THE_SUBCOMMAND = {"lightscale.cli.main"}  # LightningCLI reads "fit ..." itself


def main(argv: list[str] | None = None) -> None:
    """Run ``lightscale ARGV`` (``None``: the process's command line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    module = COMMANDS.get(args[0]) if args else None
    if module is None:  # --help, --version, or a mistake: LightningCLI explains
        module = "lightscale.cli.main"
    run = importlib.import_module(module).main
    if module in ARGUMENTS_ARE_THE_SUBCOMMAND:
        return run(argv)
    return run(args[1:])


if __name__ == "__main__":
    main()
