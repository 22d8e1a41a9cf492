"""What a run records: the W&B and CSV loggers, and the callbacks that write ``summary.json``, provenance, the
saved config, throughput and MFU, peak memory, per-rank times, best-checkpoint metrics, predictions and the
progress lines.

Imports :mod:`lightscale.core`, :mod:`lightscale.cluster` and Lightning; nothing above them.
"""
