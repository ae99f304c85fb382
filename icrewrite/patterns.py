"""What the analysis recognises: BatchNorm layers, activations, fused norm+act modules.

Recognition is by behaviour where it can be (``_BatchNorm`` subclasses, the modules in
``torch.nn.modules.activation`` and ``timm.layers.activations*``) and lists the rest
(frozen BatchNorm classes keep their statistics in buffers and share no base class).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "is_batchnorm",
    "fused_activation",
    "is_activation_module",
    "activation_of",
    "bn_affine",
    "is_passthrough",
    "through_passthrough",
    "Activation",
]

Activation = Callable[[torch.Tensor], torch.Tensor]

_FROZEN_BN_NAMES = {"FrozenBatchNorm2d", "FrozenBatchNormAct2d"}
_PASSTHROUGH = {"DropBlock2d", "DropPath"}

# Modules in torch.nn.modules.activation that are not elementwise activations.
_NOT_ACTIVATIONS = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU)

_ACTIVATION_FUNCTIONS: set[Callable] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.mish, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Nodes that are the identity in eval mode: ``nn.Identity``, dropout, DropBlock, DropPath."""
    if node.op != "call_module" or len(node.args) != 1:
        return False
    module = modules.get(node.target)
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or type(module).__name__ in _PASSTHROUGH


def through_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The consumers of ``node``, looking through chains of pass-through nodes."""
    found = []
    for user in node.users:
        found.extend(through_passthrough(user, modules) if is_passthrough(user, modules) else [user])
    return found


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm of any flavour: torch's, timm's fused ``BatchNormAct2d``, sync and frozen variants."""
    return isinstance(module, _BatchNorm) or type(module).__name__ in _FROZEN_BN_NAMES


def fused_activation(norm: nn.Module) -> nn.Module | None:
    """The activation a fused norm+act module (timm ``BatchNormAct2d`` family) applies, if any."""
    act = getattr(norm, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        return act
    return None


def is_activation_module(module: nn.Module) -> bool:
    """Elementwise activation modules of torch and timm (timm's ``create_act_layer`` results)."""
    if isinstance(module, _NOT_ACTIVATIONS):
        return False
    mod = type(module).__module__
    return mod == "torch.nn.modules.activation" or mod.startswith("timm.layers.activations")


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> Activation | None:
    """The elementwise activation that ``node`` applies, as a callable on tensors, or None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        return module if module is not None and is_activation_module(module) else None
    extra = [a for a in node.args[1:] if not isinstance(a, fx.Node)]
    if len(extra) != len(node.args) - 1 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return None
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS:
        fn = node.target
        return lambda t: fn(t, *extra, **kwargs)
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        name = node.target.rstrip("_")
        return lambda t: getattr(t, name)()
    return None


@torch.no_grad()
def bn_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm: ``BN(x) = scale * x + shift`` per channel."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if getattr(norm, "weight", None) is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if getattr(norm, "bias", None) is not None:
        shift = shift + norm.bias
    return scale, shift


