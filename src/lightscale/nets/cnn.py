"""A small convolutional network for low-resolution images (8x8 digits by default)."""

from collections.abc import Sequence

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv blocks (conv -> batch-norm -> GELU, then 2x2 pooling) followed by a linear classifier.

    Global average pooling at the end keeps the head independent of the input resolution, so the same net
    serves 8x8 digits and larger images without edits.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.GELU(),
                nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.GELU(),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(previous, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits of shape (batch, num_classes) for images of shape (batch, C, H, W)."""
        return self.head(self.features(images))
