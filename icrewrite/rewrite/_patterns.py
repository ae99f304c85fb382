"""Graph patterns the analysis matches: activations applied to a node, pass-through chains,
fused norm+act modules. Which classes are norms, activations and pass-through layers is
the registry's (``icrewrite.registry``); this module reads graphs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..registry import is_activation_module, is_passthrough_module

__all__ = ["fused_activation", "activation_of", "is_passthrough", "through_passthrough", "Activation"]

Activation = Callable[[torch.Tensor], torch.Tensor]

_ACTIVATION_FUNCTIONS: set[Callable] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.silu, F.gelu, F.mish, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def is_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Module calls that are the identity in eval mode (registered pass-through layers)."""
    if node.op != "call_module" or len(node.args) != 1:
        return False
    module = modules.get(node.target)
    return module is not None and is_passthrough_module(module)


def through_passthrough(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The consumers of ``node``, looking through chains of pass-through nodes."""
    found = []
    for user in node.users:
        found.extend(through_passthrough(user, modules) if is_passthrough(user, modules) else [user])
    return found


def fused_activation(norm: nn.Module) -> nn.Module | None:
    """The activation a fused norm+act module (timm ``BatchNormAct2d`` family) applies, if any."""
    act = getattr(norm, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        return act
    return None


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
