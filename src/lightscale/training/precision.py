"""bf16 mixed precision that lets fused optimizers clip gradients."""

from typing import Any

from lightning.pytorch.plugins.precision import MixedPrecision, Precision


class UnscaledMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` refuses gradient clipping with optimizers that unscale gradients themselves
    (``fused=True`` AdamW/Adam/SGD), because under fp16 the gradients it would clip are still multiplied by the
    loss scale. bf16 needs no loss scale: there is no ``GradScaler``, the gradients are their true values, and
    clipping them is exactly what it is in fp32. This plugin clips in that case and keeps the refusal for fp16.
    """

    def clip_gradients(self, optimizer: Any, clip_val: int | float = 0.0, gradient_clip_algorithm: Any = None) -> None:
        if self.scaler is None:
            Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
        else:
            super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)


def install_unscaled_mixed_precision(trainer: Any) -> None:
    """Replace the Trainer's stock bf16 ``MixedPrecision`` plugin by :class:`UnscaledMixedPrecision`."""
    plugin = trainer.strategy.precision_plugin
    if type(plugin) is MixedPrecision and plugin.scaler is None:
        trainer.strategy.precision_plugin = UnscaledMixedPrecision(plugin.precision, plugin.device)
