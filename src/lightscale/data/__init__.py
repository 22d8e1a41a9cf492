"""LightningDataModules: each owns download/preparation, splits, and the DataLoaders of one data set."""

from lightscale.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
