"""Plain ``torch.nn.Module`` networks: no Lightning here, so they can be reused in any training loop."""

from lightscale.nets.cnn import SmallCNN

__all__ = ["SmallCNN"]
