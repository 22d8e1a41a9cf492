"""The ``lightscale`` command: LightningCLI with the template's defaults (``defaults.yaml``), run directories,
safe checkpoint loading, and one-line errors.

- :mod:`~lightscale.cli.app`: ``LightscaleCLI``, the groups and hooks.
- :mod:`~lightscale.cli.main`: the entry point of ``fit|validate|test|predict``: errors and exit codes.
- :mod:`~lightscale.cli.checks`, :mod:`~lightscale.cli.config_files`: what is refused before anything runs.
- :mod:`~lightscale.cli.checkpoints`: which checkpoint a command loads, opened safely.
- :mod:`~lightscale.cli.ownership`: a command's hold on its run directory, and how it ends.
- :mod:`~lightscale.cli.preflight`: ``lightscale preflight``, a SLURM job checked before it queues.

The top layer: imports every other part of lightscale; nothing imports it but ``lightscale.__main__``.
"""

from lightscale.cli.app import LightscaleCLI
from lightscale.cli.main import main

__all__ = ["LightscaleCLI", "main"]
