"""LightningModules: how each network is trained (loss, optimizer, schedule, metrics)."""

from lightscale.models.causal_lm import CausalLM
from lightscale.models.classifier import Classifier

__all__ = ["CausalLM", "Classifier"]
