"""LightningDataModules: each owns preparation, splits and the DataLoaders of one data set."""

from lightscale.data.digits import DigitsDataModule
from lightscale.data.text import TextDataModule

__all__ = ["DigitsDataModule", "TextDataModule"]
