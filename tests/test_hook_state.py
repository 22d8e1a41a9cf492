"""FastHookState: Lightning's hook bookkeeping skips nn.Module.__setattr__, everything else still goes through it."""

import torch
from torch import nn

from lightscale.models import Classifier


def test_hook_name_is_a_plain_attribute_and_modules_still_register() -> None:
    model = Classifier(channels=[2])
    model._current_fx_name = "training_step"
    assert model._current_fx_name == "training_step" and "_current_fx_name" in vars(model)
    model.extra = nn.Linear(2, 2)  # other assignments keep nn.Module's registration of modules and parameters
    model.scale = nn.Parameter(torch.ones(1))
    assert "extra" in model._modules and "scale" in model._parameters
    assert {"extra.weight", "scale"} <= {name for name, _ in model.named_parameters()}
