"""Basics every other part of lightscale uses: one-line user errors, atomic files, number formats, the run
directory (naming, ownership, ``summary.json``) and the machine's CPU name.

Imports only the standard library and PyYAML: no torch, no Lightning, so scripts that only place or read runs
(``slurm/*.sbatch``, ``lightscale report``, the benchmarks) start in milliseconds.
"""
