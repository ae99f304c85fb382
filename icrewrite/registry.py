"""What icrewrite recognises in a model, and how to teach it your own layers.

Recognition is by class, with ``isinstance`` (a subclass of a registered class is
recognised too), in one table per kind, each entry with the reason it is there, in the
manner of timm's ``register_notrace_module``. The built-in torch, torchvision and timm
layers are registered below through the same functions a user calls:

- ``register_weight_layer(cls)``: a layer that applies a weight to its input (conv,
  linear). It gets an IC block on its input, whose features the analysis reads off the
  input its conv/linear call receives when the layer says none; ``foldable=True`` says a BatchNorm after it
  folds exactly into its ``weight`` and ``bias`` (only for that exact class: a subclass may
  change ``forward``);
- ``register_norm(cls)``: a BatchNorm-like layer with ``running_mean``/``running_var`` and an
  optional affine, which the analysis folds when it sits before an activation;
- ``register_activation(cls)``: an elementwise activation module;
- ``register_passthrough(cls)``: a layer that is the identity in eval mode (dropout, DropPath);
- ``register_reroute(cls, find, routes_to=...)``: an attention module that uses a weight layer's
  weight functionally; ``find(module, calls)`` returns a :class:`~icrewrite.rewrite.Reroute` (how to
  make it call the layer as a module) or None; ``routes_to`` lists the classes it turns modules
  into, the only classes a plan may name. See docs/registry.md for worked examples.

Each ``register_*`` returns the class, so it also works as a decorator.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.fx as fx
import torch.nn.functional as F
import torchvision.ops.misc
from timm import layers as timm_layers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ConversionError
from .layers import IC_BASES, ICWeightLayer, ic_base

__all__ = [
    "WEIGHT_FUNCTIONS",
    "WeightLayer",
    "register_weight_layer",
    "register_norm",
    "register_activation",
    "register_passthrough",
    "register_reroute",
    "weight_layer",
    "weight_layer_classes",
    "is_weight_layer",
    "weight_layer_features",
    "declared_features",
    "features_unknown",
    "is_foldable_into",
    "is_batchnorm",
    "is_activation_module",
    "is_passthrough_module",
    "reroute_finders",
    "class_path",
    "routed_class",
]

# Functions that apply a weight to their input (argument 1, or ``weight=``): what a weight
# layer's forward calls, and what the analysis looks for in modules that are none.
WEIGHT_FUNCTIONS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                              F.conv_transpose3d})

ModuleClass = TypeVar("ModuleClass", bound=type)
Features = Callable[[nn.Module], "tuple[int, int]"]
RerouteFinder = Callable[[nn.Module, "Sequence[fx.Node]"], Any]


@dataclass(frozen=True)
class WeightLayer:
    """A registered weight-layer class: how to read the features of its input, and whether a
    BatchNorm after it folds exactly into its weight."""

    cls: type[nn.Module]
    # module -> (number of input features, feature dim: 1 for (N, C, *), -1 for (*, C)); None: the
    # module's in_channels/in_features, else what the analysis sees its weight op receive
    features: Features | None
    foldable: bool
    reason: str


def _input_features(module: nn.Module) -> tuple[int, int] | None:
    """``in_channels`` over dim 1 (convolutions), else ``in_features`` over the last dim (linear
    layers), else None."""
    if isinstance(getattr(module, "in_channels", None), int):
        return module.in_channels, 1
    if isinstance(getattr(module, "in_features", None), int):
        return module.in_features, -1
    return None


_WEIGHT_LAYERS: dict[type[nn.Module], WeightLayer] = {}
_NORMS: dict[type[nn.Module], str] = {}
_ACTIVATIONS: dict[type[nn.Module], str] = {}
_PASSTHROUGH: dict[type[nn.Module], str] = {}
_REROUTES: dict[type[nn.Module], tuple[RerouteFinder, str]] = {}
_ROUTED_CLASSES: dict[str, type[nn.Module]] = {}  # class_path -> a class register_reroute declared


def _check_class(cls: Any, kind: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConversionError(f"register_{kind} takes an nn.Module subclass, got {cls!r}")


def register_weight_layer(cls: ModuleClass, *, features: Features | None = None, foldable: bool = False,
                          reason: str = "") -> ModuleClass:
    """Recognise ``cls`` (and its subclasses) as a weight layer: it gets an IC block on its input.

    The IC block normalises the layer's input over dim 1 of ``(N, C, *)`` (``feature_dim=1``)
    or the last dim of ``(*, C)`` (``-1``). By default its features are ``in_channels`` over
    dim 1 or ``in_features`` over the last dim; a layer with neither has them read by the
    analysis from the input its conv/linear call receives in a forward pass on ``meta``
    tensors (dim 1 for ``F.conv*``, the last dim for ``F.linear``). ``features(module) ->
    (num_features, feature_dim)`` overrides both, for layers whose input the analysis
    cannot see (never called) or whose weight op reads a reshaped input.
    ``foldable=True``: the output is linear in ``weight`` plus ``bias`` (a plain convolution
    or linear map), so a BatchNorm after a layer of exactly this class folds into it.
    The layer's ``forward`` must take the input first; its IC block runs on it.
    """
    _check_class(cls, "weight_layer")
    _WEIGHT_LAYERS[cls] = WeightLayer(cls, features, foldable, reason)
    IC_BASES.add(cls)
    return cls


def register_norm(cls: ModuleClass, *, reason: str = "") -> ModuleClass:
    """Recognise ``cls`` as BatchNorm: ``running_mean``, ``running_var``, ``eps`` and optional
    ``weight``/``bias``, normalising dim 1 (a fused norm+act module keeps its activation as ``act``)."""
    _check_class(cls, "norm")
    _NORMS[cls] = reason
    return cls


def register_activation(cls: ModuleClass, *, reason: str = "") -> ModuleClass:
    """Recognise ``cls`` as an elementwise activation (what a BatchNorm before it is folded for)."""
    _check_class(cls, "activation")
    _ACTIVATIONS[cls] = reason
    return cls


def register_passthrough(cls: ModuleClass, *, reason: str = "") -> ModuleClass:
    """Recognise ``cls`` as the identity in eval mode, so patterns are matched through it."""
    _check_class(cls, "passthrough")
    _PASSTHROUGH[cls] = reason
    return cls


def register_reroute(cls: ModuleClass, find: RerouteFinder, *, routes_to: Sequence[type[nn.Module]] = (),
                     reason: str = "") -> ModuleClass:
    """Let modules of ``cls`` that use a weight layer's weight functionally be rerouted.

    ``find(module, calls)`` gets the module and its ``call_module`` nodes in the traces and
    returns a ``Reroute`` (the child layers it makes module calls, and the class it turns
    the module into, which must compute the same function) or None. Every class ``find`` may
    return is listed in ``routes_to``: each must subclass ``cls``. A plan records a routed class
    by its name, ``"module:qualname"`` (:func:`class_path`), and a plan read from a file
    resolves that name only among the classes registered here, never by importing it.
    """
    _check_class(cls, "reroute")
    for routed in routes_to:
        _check_class(routed, "reroute's routes_to")
        if not issubclass(routed, cls):
            raise ConversionError(f"register_reroute: {routed.__name__} in routes_to is not a subclass of "
                                  f"{cls.__name__}")
    _REROUTES[cls] = (find, reason)
    _ROUTED_CLASSES.update({class_path(routed): routed for routed in routes_to})
    return cls


def class_path(cls: type) -> str:
    """``"module:qualname"``: the name a plan records a routed class by."""
    return f"{cls.__module__}:{cls.__qualname__}"


def routed_class(path: str) -> type[nn.Module] | None:
    """The class named ``path`` that ``register_reroute(..., routes_to=...)`` declared in this
    process, or None. Nothing is imported: a name read from a file is only looked up."""
    return _ROUTED_CLASSES.get(path)


def _lookup(table: dict[type, Any], module: nn.Module) -> Any:
    """The entry of the most specific registered class of ``module`` (its MRO order), or None."""
    return next((table[c] for c in type(module).__mro__ if c in table), None)


def weight_layer(module: nn.Module) -> WeightLayer | None:
    """The registration that makes ``module`` a weight layer, or None.

    An ``IC<Base>`` layer of icrewrite is a subclass of its base, so it is found as its base is.
    """
    return _lookup(_WEIGHT_LAYERS, module)


def weight_layer_classes() -> list[type[nn.Module]]:
    """Every registered weight-layer class."""
    return list(_WEIGHT_LAYERS)


def is_weight_layer(module: nn.Module) -> bool:
    return weight_layer(module) is not None


def declared_features(module: nn.Module) -> tuple[int, int] | None:
    """``(num_features, feature_dim)`` of a weight layer's input as the layer itself tells it
    (its IC block, its registration's ``features``, its ``in_channels``/``in_features``), or
    None when only a forward pass can (what the analysis then reads, ``rewrite/_probe.py``)."""
    entry = weight_layer(module)
    if entry is None:
        raise ConversionError(f"{type(module).__name__} is not a registered weight layer")
    if isinstance(module, ICWeightLayer):
        return module.ic.num_features, module.ic.feature_dim
    if entry.features is not None:
        return entry.features(module)
    return _input_features(module)


def features_unknown(module: nn.Module, why: str) -> str:
    """The one-line message for a weight layer whose input features nothing tells, with the fix."""
    cls = type(module)
    return (f"the input features of {cls.__name__} are unknown ({why}); register it with "
            f"icrewrite.register_weight_layer({cls.__module__}.{cls.__qualname__}, "
            "features=lambda m: (num_features, feature_dim))")


def weight_layer_features(module: nn.Module) -> tuple[int, int]:
    """``(num_features, feature_dim)`` of a weight layer's input, as :func:`declared_features`
    tells it; ``ConversionError`` for a layer whose features only the analysis reads."""
    features = declared_features(module)
    if features is None:
        raise ConversionError(features_unknown(module, "it has no in_channels or in_features, and they are read "
                                                       "from its input only when a model is analysed"))
    return features


def is_foldable_into(module: nn.Module) -> bool:
    """True when a BatchNorm after ``module`` folds into its weight and bias exactly: its own
    class (for an IC layer, its base class) is registered with ``foldable=True``."""
    cls = ic_base(type(module)) if isinstance(module, ICWeightLayer) else type(module)
    entry = _WEIGHT_LAYERS.get(cls)
    return entry is not None and entry.foldable


def is_batchnorm(module: nn.Module) -> bool:
    return _lookup(_NORMS, module) is not None


def is_activation_module(module: nn.Module) -> bool:
    return _lookup(_ACTIVATIONS, module) is not None


def is_passthrough_module(module: nn.Module) -> bool:
    return _lookup(_PASSTHROUGH, module) is not None


def reroute_finders(module: nn.Module) -> list[RerouteFinder]:
    """The reroute finders registered for ``module``'s classes, most specific first."""
    return [_REROUTES[c][0] for c in type(module).__mro__ if c in _REROUTES]


# --- the built-in layers --------------------------------------------------------------------

for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_weight_layer(_cls, foldable=True, reason="torch convolution")
register_weight_layer(nn.modules.conv._ConvNd, reason="any torch convolution (subclasses such as timm's StdConv2d "
                                                     "change forward, so they do not fold)")
register_weight_layer(nn.Linear, foldable=True, reason="torch linear layer")
register_weight_layer(timm_layers.Conv2dSame, foldable=True, reason="timm: 'same' padding, then a plain conv2d")
register_weight_layer(timm_layers.CondConv2d, reason="timm: experts mixed per sample")

register_norm(_BatchNorm, reason="torch BatchNorm of any rank, SyncBatchNorm, timm's BatchNormAct2d")
register_norm(torchvision.ops.misc.FrozenBatchNorm2d, reason="torchvision/timm frozen BatchNorm (buffers only)")
register_norm(timm_layers.FrozenBatchNormAct2d, reason="timm frozen BatchNorm + activation")

_NOT_ELEMENTWISE = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU)
for _module in (nn.modules.activation, timm_layers.activations, timm_layers.activations_me):
    for _cls in vars(_module).values():
        if (inspect.isclass(_cls) and issubclass(_cls, nn.Module) and _cls.__module__ == _module.__name__
                and not issubclass(_cls, _NOT_ELEMENTWISE)):
            register_activation(_cls, reason=f"elementwise activation of {_module.__name__}")

register_passthrough(nn.Identity, reason="identity")
register_passthrough(nn.modules.dropout._DropoutNd, reason="dropout: the identity in eval mode")
register_passthrough(timm_layers.DropBlock2d, reason="timm DropBlock: the identity in eval mode")
register_passthrough(timm_layers.DropPath, reason="timm stochastic depth: the identity in eval mode")
