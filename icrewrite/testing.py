"""Helpers to test conversions honestly (used by the test suite and the zoo sweep)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every norm layer's statistics and affine parameters far from their defaults.

    With default BatchNorm (mean 0, var 1, gamma 1, beta 0) a wrong fold can go unnoticed;
    "function preserved" only means something after this. Works in place, returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=gen) * (high - low) + low).to(t)

    for module in model.modules():
        if isinstance(module, _NormBase) or type(module).__name__.startswith("FrozenBatchNorm"):
            for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.3, 3.0), ("weight", 0.3, 2.0), ("bias", -0.5, 0.5)):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                    t.copy_(rand(t, low, high))
    return model


@torch.no_grad()
def weight_layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each weight layer actually receives after its IC block, in the current mode.

    Hooks sit on the weight layers' ``forward`` pre-hooks, and for converted layers on the IC
    block's output, so what is measured is what the weights see, whatever the names say.
    Inputs are returned as ``(samples, features)``.
    """
    from .layers import ICWeightLayer, is_weight_layer, weight_layer_features

    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if not is_weight_layer(module):
            continue
        _, feature_dim = weight_layer_features(module)

        def capture(t: torch.Tensor, name: str = name, feature_dim: int = feature_dim) -> None:
            t = t.detach().float()
            t = t.transpose(1, -1) if feature_dim == 1 else t
            seen.setdefault(name, t.reshape(-1, t.shape[-1]))

        if isinstance(module, ICWeightLayer):
            handles.append(module.ic.register_forward_hook(lambda m, a, out, c=capture: c(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda m, a, c=capture: c(a[0])))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen
