"""Graph patterns the analysis matches: activations applied to a node, pass-through chains,
fused norm+act modules. Which classes are norms, activations and pass-through layers is
the registry's (``icrewrite.registry``); this module reads graphs.

An activation found in a graph is described as data (:class:`ModuleActivation`,
:class:`FunctionActivation`), so that a plan records it and ``convert`` recomputes it from
the model alone when it derives IC statistics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..registry import is_activation_module, is_passthrough_module

__all__ = ["fused_activation", "activation_of", "is_passthrough", "through_passthrough", "Activation",
           "ActivationRef", "ModuleActivation", "FunctionActivation", "ACTIVATION_FUNCTIONS", "Constant"]

Activation = Callable[[torch.Tensor], torch.Tensor]
Constant = Union[int, float, bool, str, None]  # a constant argument an activation call may record
_CONSTANT_TYPES = (int, float, bool, str, type(None))

# Elementwise activation functions FX records as call_function targets, by the name a plan records;
# ``Tensor.*`` entries are the out-of-place forms of the methods in _ACTIVATION_METHODS.
ACTIVATION_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "F.relu": F.relu, "F.relu_": F.relu_, "torch.relu": torch.relu, "torch.relu_": torch.relu_, "F.relu6": F.relu6,
    "F.silu": F.silu, "F.gelu": F.gelu, "F.mish": F.mish, "F.hardswish": F.hardswish,
    "F.hardsigmoid": F.hardsigmoid, "F.leaky_relu": F.leaky_relu, "F.elu": F.elu, "F.selu": F.selu,
    "F.celu": F.celu, "F.softplus": F.softplus, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh,
    "F.sigmoid": F.sigmoid, "F.tanh": F.tanh,
    "Tensor.relu": torch.Tensor.relu, "Tensor.sigmoid": torch.Tensor.sigmoid, "Tensor.tanh": torch.Tensor.tanh,
}
_FUNCTION_NAMES = {fn: name for name, fn in ACTIVATION_FUNCTIONS.items() if not name.startswith("Tensor.")}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


@dataclass(frozen=True)
class ModuleActivation:
    """An activation module of the model, by its path (``layer1.0.act1``, ``bn1.act`` for a fused norm)."""

    module: str

    def resolve(self, model: nn.Module) -> Activation:
        """The module itself: what the graph calls."""
        return model.get_submodule(self.module)

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module}


@dataclass(frozen=True)
class FunctionActivation:
    """A call of a function of :data:`ACTIVATION_FUNCTIONS` with constant arguments after the
    tensor (``F.leaky_relu(x, 0.2)``, ``F.gelu(x, approximate="tanh")``; ``inplace`` dropped).

    Equal descriptions compute the same function, so sites that share one share a quadrature.
    """

    function: str
    args: tuple[Constant, ...] = ()
    kwargs: tuple[tuple[str, Constant], ...] = ()  # sorted by name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATION_FUNCTIONS[self.function](x, *self.args, **dict(self.kwargs))

    def resolve(self, model: nn.Module) -> Activation:
        """Itself: it needs nothing from the model."""
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"function": self.function, "args": list(self.args), "kwargs": dict(self.kwargs)}


ActivationRef = Union[ModuleActivation, FunctionActivation]


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


def activation_of(node: fx.Node, modules: dict[str, nn.Module], qualname: Callable[[str], str] = str
                  ) -> ActivationRef | None:
    """The elementwise activation that ``node`` applies, described as data, or None.

    ``qualname`` turns a ``call_module`` target into the module's path in the whole model.
    Function calls count only when every argument after the tensor is a constant
    (int, float, bool, str or None), which a plan can record.
    """
    if node.op == "call_module":
        module = modules.get(node.target)
        return ModuleActivation(qualname(node.target)) if module is not None and is_activation_module(module) else None
    extra = node.args[1:]
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if not all(isinstance(v, _CONSTANT_TYPES) for v in (*extra, *kwargs.values())):
        return None
    if node.op == "call_function" and node.target in _FUNCTION_NAMES:
        return FunctionActivation(_FUNCTION_NAMES[node.target], tuple(extra), tuple(sorted(kwargs.items())))
    if node.op == "call_method" and node.target in _ACTIVATION_METHODS:
        return FunctionActivation(f"Tensor.{node.target.rstrip('_')}")
    return None
