"""lightscale: a PyTorch Lightning template from a laptop CPU to multi-node SLURM clusters."""

__version__ = "0.1.0"
