"""The edit kinds of a plan: each one class with its fields, its JSON form, its checks against
a model, and its effect.

An edit is data (module paths, numbers, strings), so a plan goes through JSON and applies to
any model of the same architecture. Each kind says:

- ``check(model, where)``: whether it fits ``model``: every module it names exists and is the
  kind of module the edit needs, ``features`` and ``param_delta`` are what that module implies.
  A plan is checked as a whole (``Plan.check``) before anything is built or allocated, so a
  plan from a file that asks for ``"features": 10**12`` is refused, never allocated;
- ``phase``: when it applies. ``apply`` runs the phases in order (:class:`Phase`), each edit of
  a phase in plan order; ``prepare`` runs first for every edit, on the model as it was;
- ``apply(model, context)``: the change itself.

Adding an edit kind is one class here plus the planning rule that makes it (``_plan.py``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..errors import ConversionError
from ..layers import IC, ICWeightLayer, attach_ic
from ..registry import declared_features, is_activation_module, is_batchnorm, is_foldable_into, is_weight_layer
from ._clone import clone_module
from ._init_stats import site_moments
from ._layouts import branch_end_module
from ._patterns import ACTIVATION_FUNCTIONS, ActivationRef, FunctionActivation, ModuleActivation
from ._reroute import Reroute, resolve_routed_class, route

__all__ = ["Phase", "ApplyContext", "Statistics", "Edit", "InsertIC", "FoldNorm", "ReplaceNormAct",
           "RouteThroughModule", "MoveAct", "InsertICAfter", "EDIT_KINDS", "Reader", "fold_bn_into",
           "replace_module", "tied_parameters", "ModelView", "EditMismatch", "check_edits", "own_params"]


class Phase(IntEnum):
    """When an edit applies; ``apply`` runs the phases in this order."""

    FOLD = 1  # BatchNorms folded into the weight layer before them (reads the weights as they were)
    LAYOUT = 2  # activations moved across residual adds
    ROUTE = 3  # attention modules made to call their weight layers as modules
    ATTACH = 4  # IC blocks attached to weight layers and branch ends


# --- reading serialised plans ------------------------------------------------------------------

class Reader:
    """One JSON object of a serialised plan, read field by field. Every problem is a one-line
    ``ConversionError`` that says where it is (``edits[3].features``); the object must have
    exactly ``keys`` (and may lack the ``optional`` ones)."""

    def __init__(self, data: Any, where: str, keys: Iterable[str], optional: Iterable[str] = ()) -> None:
        self.where = where
        if not isinstance(data, dict):
            raise self.error(f"expected an object, got {type(data).__name__}")
        keys, optional = list(keys), set(optional)
        missing = [k for k in keys if k not in data and k not in optional]
        unknown = [repr(k)[1:-1] if isinstance(k, str) else repr(k) for k in data if k not in keys]  # one line
        if missing or unknown:
            raise self.error("; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                       + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
        self.data = data

    def error(self, message: str, key: str | None = None) -> ConversionError:
        where = f"{self.where}.{key}" if key else self.where
        return ConversionError(f"malformed plan: {where}: {message}")

    def get(self, key: str, *types: type, default: Any = ...) -> Any:
        """The value of ``key``, of exactly one of ``types`` (so ``True`` is not an ``int``);
        ``default`` when ``key`` is absent and a default is given."""
        if key not in self.data:
            if default is ...:
                raise self.error("missing", key)
            return default
        value = self.data[key]
        if type(value) not in types:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise self.error(f"expected {names}, got {type(value).__name__}", key)
        return value

    def count(self, key: str, minimum: int = 0) -> int:
        """A whole number of at least ``minimum``."""
        value = self.get(key, int)
        if value < minimum:
            raise self.error(f"expected a number of at least {minimum}, got {value}", key)
        return value

    def probability(self, key: str) -> float:
        """A dropout probability, ``0 <= p < 1`` (JSON's NaN and Infinity are refused)."""
        value = self.get(key, float, int)
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise self.error(f"expected a dropout probability in [0, 1), got {value}", key)
        return float(value)

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of strings, as a tuple."""
        values = self.get(key, list)
        if not all(type(v) is str for v in values):
            raise self.error("expected a list of strings", key)
        return tuple(values)

    def objects(self, key: str, read: Callable[[Any, str], Any]) -> list[Any]:
        """A list of objects, each read by ``read(data, where)``."""
        return [read(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(self.get(key, list))]


_CONSTANTS = (int, float, bool, str, type(None))


def _read_activation(data: Any, where: str) -> ActivationRef:
    """``{"module": path}`` or ``{"function": name, "args": [...], "kwargs": {...}}``; a function
    is looked up in ``ACTIVATION_FUNCTIONS`` by its name, never imported."""
    if isinstance(data, dict) and "module" in data:
        return ModuleActivation(Reader(data, where, ["module"]).get("module", str))
    reader = Reader(data, where, ["function", "args", "kwargs"])
    function = reader.get("function", str)
    if function not in ACTIVATION_FUNCTIONS:
        raise reader.error(f"unknown activation function {function!r}", "function")
    args, kwargs = reader.get("args", list), reader.get("kwargs", dict)
    values = (*args, *kwargs.values())
    if not all(type(v) in _CONSTANTS for v in values) or not all(type(k) is str for k in kwargs) or any(
            type(v) is float and not math.isfinite(v) for v in values):
        raise reader.error("activation arguments must be finite numbers, booleans, strings or null, by name or "
                           "position")
    return FunctionActivation(function, tuple(args), tuple(sorted(kwargs.items())))


# --- what edits need to look at a model ---------------------------------------------------------

def own_params(module: nn.Module | None) -> int:
    """The number of parameters ``module`` holds itself (not its children's)."""
    return 0 if module is None else sum(p.numel() for p in module.parameters(recurse=False))


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """For each module that shares a parameter with another module (``b.weight = a.weight``), the
    full names of the parameters it shares, e.g. ``{"b": ["b.weight is a.weight"], ...}``."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    tied: dict[str, list[str]] = {}
    for names in owners.values():
        for name in names if len(names) > 1 else ():
            others = [n for n in names if n != name]
            tied.setdefault(name.rpartition(".")[0], []).append(f"{name} is {others[0]}")
    return tied


@dataclass
class ModelView:
    """What ``check`` reads of a model: its modules by every name they have, and its ties."""

    model: nn.Module
    modules: dict[str, nn.Module]
    tied: dict[str, list[str]]

    @classmethod
    def of(cls, model: nn.Module) -> ModelView:
        return cls(model, dict(model.named_modules(remove_duplicate=False)), tied_parameters(model))


# --- applying ------------------------------------------------------------------------------------

def _parent_name(target: str) -> tuple[str, str]:
    """``"layer1.0.bn1"`` -> ``("layer1.0", "bn1")``."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def replace_module(model: nn.Module, target: str, new: nn.Module) -> None:
    parent, name = _parent_name(target)
    setattr(model.get_submodule(parent), name, new)


@torch.no_grad()
def fold_bn_into(layer: nn.Module, norm: nn.Module) -> None:
    """Fold eval-mode BatchNorm ``norm`` that follows ``layer`` into ``layer``'s weight and bias."""
    args = (norm.running_mean, norm.running_var, norm.eps, getattr(norm, "weight", None), getattr(norm, "bias", None))
    if isinstance(layer, nn.Linear):
        weight, bias = fuse_linear_bn_weights(layer.weight, layer.bias, *args)
    else:
        transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, *args, transpose=transpose)
    bias.requires_grad_(weight.requires_grad)  # a bias created from BatchNorm buffers would not train
    layer.weight, layer.bias = weight, bias


class _ICFactory:
    """New IC blocks, copied from one prototype per shape, p, device and dtype.

    A model has dozens of sites and few distinct shapes, and copying a block
    (``clone_module``) costs a third of constructing one (``BatchNorm.__init__`` and its
    resets). With ``identity``, prototypes are the identity in eval mode (``set_identity``
    with default statistics), so the sites with no statistics of their own need nothing more.
    """

    def __init__(self, identity: bool) -> None:
        self.identity = identity
        self._prototypes: dict[tuple[Any, ...], IC] = {}

    def __call__(self, features: int, p: float, feature_dim: int, like: torch.Tensor, training: bool) -> IC:
        key = (features, p, feature_dim, like.device, like.dtype, training)
        if key not in self._prototypes:
            prototype = IC(features, p, feature_dim=feature_dim, device=like.device, dtype=like.dtype)
            if self.identity and like.device.type != "meta":
                prototype.set_identity()
            self._prototypes[key] = prototype.train(training)
        return clone_module(self._prototypes[key])


@dataclass
class ApplyContext:
    """What the edits of one ``apply`` share: the modules as they were before any edit (weight
    layers keep their place; only norms and activations are replaced, once each), whether IC
    blocks preserve the function, and the data-free statistics the ``insert-ic`` edits gather
    in ``prepare`` (computed together, so that sites with one activation share a quadrature)."""

    modules: dict[str, nn.Module]
    preserve: bool
    new_ic: _ICFactory = field(init=False)
    sites: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _moments: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        self.new_ic = _ICFactory(identity=self.preserve)

    def moments(self, target: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The IC input mean and variance for ``target`` derived from its site, or None."""
        if self._moments is None:
            self._moments = site_moments(self.sites)
        return self._moments.get(target)


# --- the edit kinds -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Statistics:
    """Where an IC block's data-free statistics come from: its layer reads ``activation`` of
    the output of BatchNorm ``norm``. ``convert`` recomputes them from the model (that norm's
    affine, that activation) when it applies the plan, before any BatchNorm is folded."""

    norm: str
    activation: ActivationRef

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "activation": self.activation.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Statistics:
        reader = Reader(data, where, ["norm", "activation"])
        return cls(reader.get("norm", str), _read_activation(reader.data["activation"], f"{where}.activation"))


class EditMismatch(ConversionError):
    """An edit of a plan does not fit the model it is applied to."""


@dataclass(frozen=True)
class Edit:
    """One change to the model: the fields every kind has. ``param_delta`` is exact (``verify``
    measures the same); ``action`` names the kind in ``print(plan)`` and in ``to_dict()``."""

    action: ClassVar[str]
    phase: ClassVar[Phase]
    target: str  # module path
    features: int
    param_delta: int
    detail: str

    def module_paths(self) -> tuple[str, ...]:
        """Every module path the edit names, all of which the model must have."""
        return (self.target,)

    def to_dict(self) -> dict[str, Any]:
        """``{"action": ..., field: value, ...}`` with JSON types (lists for tuples)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"action": self.action, **{k: _json_value(v) for k, v in values.items()}}

    @staticmethod
    def from_dict(data: Any, where: str = "edit") -> Edit:
        """The edit ``to_dict`` wrote, of the kind its ``action`` names."""
        if not isinstance(data, dict):
            raise ConversionError(f"malformed plan: {where}: expected an object, got {type(data).__name__}")
        action = data.get("action")
        kind = EDIT_KINDS.get(action) if isinstance(action, str) else None
        if kind is None:
            raise ConversionError(f"malformed plan: {where}: unknown action {action!r} (one of "
                                  f"{', '.join(EDIT_KINDS)})")
        names = [f.name for f in fields(kind)]
        reader = Reader(data, where, ["action", *names])
        return kind(**{name: _FIELD_READERS[name](reader, name) for name in names})

    # checks against a model

    def mismatch(self, where: str, message: str, key: str | None = None) -> EditMismatch:
        """The one-line error for this edit: ``edits[3] (insert-ic 'fc').features: ...``."""
        return EditMismatch(f"the plan does not fit this model: {where} ({self.action} {self.target!r})"
                            f"{'.' + key if key else ''}: {message}")

    def module(self, view: ModelView, path: str, where: str, key: str) -> nn.Module:
        """The module ``path`` of the model (looked up by name, never by attribute), or the error."""
        if path not in view.modules:
            raise self.mismatch(where, f"no module {path!r} in {type(view.model).__name__}", key)
        return view.modules[path]

    def expect(self, where: str, key: str, value: int, wanted: int, why: str) -> None:
        if value != wanted:
            raise self.mismatch(where, f"{value} does not match {why} ({wanted})", key)

    def check(self, view: ModelView, where: str) -> None:
        """Raise ``EditMismatch`` unless this edit fits the model; allocates nothing."""
        raise NotImplementedError

    # applying

    def prepare(self, model: nn.Module, context: ApplyContext) -> None:
        """Read what the edit needs from the model before any edit changes it (default: nothing)."""

    def apply(self, model: nn.Module, context: ApplyContext) -> None:
        raise NotImplementedError


def _json_value(value: Any) -> Any:
    """An edit field's value as JSON data: tuples become lists, statistics their dict."""
    if isinstance(value, tuple):
        return list(value)
    return value.to_dict() if isinstance(value, Statistics) else value


def _check_weight_layer(edit: Edit, view: ModelView, where: str) -> nn.Module:
    """``edit.target`` is a weight layer without an IC block whose input has ``edit.features``."""
    layer = edit.module(view, edit.target, where, "target")
    if not is_weight_layer(layer):
        raise edit.mismatch(where, f"{type(layer).__name__} is not a registered weight layer", "target")
    if isinstance(layer, ICWeightLayer):
        raise edit.mismatch(where, "the layer already has an IC block", "target")
    if not any(True for _ in layer.parameters()):
        raise edit.mismatch(where, "the layer has no parameters", "target")
    declared = declared_features(layer)
    if declared is not None:
        edit.expect(where, "features", edit.features, declared[0], "the layer's input features")
    elif edit.features > (weight_elements := sum(p.numel() for p in layer.parameters())):
        # features read by the analysis from the layer's input: at most one per weight element it applies
        raise edit.mismatch(where, f"{edit.features} is more than the layer's {weight_elements} weight elements "
                                   "could read", "features")
    return layer


@dataclass(frozen=True)
class InsertIC(Edit):
    """An IC block of dropout probability ``p`` on the input of weight layer ``target``:
    ``features`` over ``feature_dim`` (1 for ``(N, C, *)``, -1 for ``(*, C)``); ``statistics``
    None: default statistics."""

    action: ClassVar[str] = "insert-ic"
    phase: ClassVar[Phase] = Phase.ATTACH
    feature_dim: int
    statistics: Statistics | None
    p: float

    def module_paths(self) -> tuple[str, ...]:
        if self.statistics is None:
            return (self.target,)
        paths = (self.target, self.statistics.norm)
        activation = self.statistics.activation
        return (*paths, activation.module) if isinstance(activation, ModuleActivation) else paths

    def check(self, view: ModelView, where: str) -> None:
        layer = _check_weight_layer(self, view, where)
        if (declared := declared_features(layer)) is not None:
            self.expect(where, "feature_dim", self.feature_dim, declared[1], "the layer's feature dim")
        self.expect(where, "param_delta", self.param_delta, 2 * self.features, "an IC block's parameters")
        if self.statistics is None:
            return
        norm = self.module(view, self.statistics.norm, where, "statistics.norm")
        if not is_batchnorm(norm):
            raise self.mismatch(where, f"{type(norm).__name__} is not a BatchNorm", "statistics.norm")
        activation = self.statistics.activation
        if isinstance(activation, ModuleActivation):
            act = self.module(view, activation.module, where, "statistics.activation.module")
            if not (is_activation_module(act) or act is getattr(norm, "act", None)):
                raise self.mismatch(where, f"{type(act).__name__} is not an activation",
                                    "statistics.activation.module")

    def prepare(self, model: nn.Module, context: ApplyContext) -> None:
        """The site of the data-free statistics: that norm's affine and that activation."""
        if not context.preserve or self.statistics is None:
            return
        norm = context.modules[self.statistics.norm]
        if norm.running_mean.device.type == "meta" or norm.running_mean.numel() != self.features:
            return
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        mean = bias.detach() if bias is not None else torch.zeros_like(norm.running_mean)
        std = weight.detach() if weight is not None else torch.ones_like(norm.running_var)
        context.sites[self.target] = (self.statistics.activation.resolve(model), mean.float(), std.float())

    def apply(self, model: nn.Module, context: ApplyContext) -> None:
        layer = context.modules[self.target]  # weight layers keep their place through the other phases
        ic = context.new_ic(self.features, self.p, self.feature_dim, next(layer.parameters()), layer.training)
        moments = context.moments(self.target)
        if moments is not None:
            ic.set_identity(*moments)
        attach_ic(layer, ic)


@dataclass(frozen=True)
class FoldNorm(Edit):
    """BatchNorm ``target`` folded into the weight layer ``into`` and replaced by ``nn.Identity``."""

    action: ClassVar[str] = "fold-norm"
    phase: ClassVar[Phase] = Phase.FOLD
    into: str

    def module_paths(self) -> tuple[str, ...]:
        return self.target, self.into

    def check(self, view: ModelView, where: str) -> None:
        norm = self.module(view, self.target, where, "target")
        if not is_batchnorm(norm):
            raise self.mismatch(where, f"{type(norm).__name__} is not a BatchNorm", "target")
        self.expect(where, "features", self.features, norm.running_mean.numel(), "the BatchNorm's features")
        layer = self.module(view, self.into, where, "into")
        if not is_foldable_into(layer):
            raise self.mismatch(where, f"a BatchNorm does not fold exactly into {type(layer).__name__}", "into")
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        self.expect(where, "features", self.features, out, f"the outputs of {self.into}")
        for module in (self.into, self.target):
            if module in view.tied:
                raise self.mismatch(where, f"cannot fold: {view.tied[module][0]} (tied parameters); folding would "
                                           "untie them")
        delta = -own_params(norm) + (self.features if getattr(layer, "bias", None) is None else 0)
        self.expect(where, "param_delta", self.param_delta, delta, "the parameters the fold removes")

    def replacement(self, norm: nn.Module) -> nn.Module:
        """What stands where the folded BatchNorm was."""
        return nn.Identity()

    def apply(self, model: nn.Module, context: ApplyContext) -> None:
        norm = context.modules[self.target]
        fold_bn_into(context.modules[self.into], norm)
        replace_module(model, self.target, self.replacement(norm))


@dataclass(frozen=True)
class ReplaceNormAct(FoldNorm):
    """A fused norm+act module ``target`` folded into ``into`` and replaced by its activation
    (and its dropout, when it has one)."""

    action: ClassVar[str] = "replace-norm-act"

    def check(self, view: ModelView, where: str) -> None:
        super().check(view, where)
        if not isinstance(getattr(view.modules[self.target], "act", None), nn.Module):
            raise self.mismatch(where, "the BatchNorm has no activation module (act)", "target")

    def replacement(self, norm: nn.Module) -> nn.Module:
        drop = getattr(norm, "drop", None)
        if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
            return nn.Sequential(dict(drop=drop, act=norm.act))  # keeps the names bn.drop, bn.act
        return norm.act


@dataclass(frozen=True)
class RouteThroughModule(Edit):
    """Attention module ``target`` made to call its child weight layers ``layers`` as modules:
    it becomes ``routed_class`` (``"module:qualname"``, a class ``register_reroute`` declared) or,
    when that is None, gets timm's ``qkv_bias_separate = True``. ``features``: of the IC block
    (dropout ``p``) on the attention input (0: none)."""

    action: ClassVar[str] = "route-through-module"
    phase: ClassVar[Phase] = Phase.ROUTE
    layers: tuple[str, ...]
    routed_class: str | None
    p: float

    def module_paths(self) -> tuple[str, ...]:
        return (self.target, *self.layer_paths())

    def layer_paths(self) -> tuple[str, ...]:
        return tuple(f"{self.target}.{layer}" if self.target else layer for layer in self.layers)

    def check(self, view: ModelView, where: str) -> None:
        attention = self.module(view, self.target, where, "target")
        for path in self.layer_paths():
            if not is_weight_layer(self.module(view, path, where, "layers")):
                raise self.mismatch(where, f"{path} is not a registered weight layer", "layers")
        if self.routed_class is None:
            if not isinstance(getattr(attention, "qkv_bias_separate", None), bool):
                raise self.mismatch(where, f"{type(attention).__name__} has no qkv_bias_separate flag", "routed_class")
        else:
            try:
                resolve_routed_class(self.routed_class, type(attention))
            except ConversionError as err:
                raise self.mismatch(where, str(err), "routed_class") from None
        if self.features:
            widths = {p.shape[-1] for p in attention.parameters(recurse=False) if p.dim() == 2}
            if self.features not in widths:
                raise self.mismatch(where, f"{self.features} is not the input width of a weight of "
                                           f"{type(attention).__name__} ({sorted(widths) or 'none'})", "features")
        self.expect(where, "param_delta", self.param_delta, 2 * self.features, "the attention input's IC block")

    def reroute(self, base: type[nn.Module]) -> Reroute:
        """The reroute ``_reroute.route`` applies, with the routed class looked up (never imported)."""
        routed = None if self.routed_class is None else resolve_routed_class(self.routed_class, base)
        return Reroute(self.layers, self.features, self.detail, routed)

    def apply(self, model: nn.Module, context: ApplyContext) -> None:
        attention = model.get_submodule(self.target)
        ic = (context.new_ic(self.features, self.p, -1, next(attention.parameters()), attention.training)
              if self.features else None)  # on the attention input, before its packed projection
        route(attention, self.reroute(type(attention)), ic)


@dataclass(frozen=True)
class MoveAct(Edit):
    """The activation ``target`` after a residual add, moved into the branch after its end ``into``
    (which becomes ``Sequential(norm, act)``; see ``_layouts.py``)."""

    action: ClassVar[str] = "move-act"
    phase: ClassVar[Phase] = Phase.LAYOUT
    into: str

    def module_paths(self) -> tuple[str, ...]:
        return self.target, self.into

    def check(self, view: ModelView, where: str) -> None:
        act = self.module(view, self.target, where, "target")
        if not is_activation_module(act):
            raise self.mismatch(where, f"{type(act).__name__} is not an activation", "target")
        end = self.module(view, self.into, where, "into")
        features = getattr(end, "num_features", None)
        if not isinstance(features, int):
            raise self.mismatch(where, f"{type(end).__name__} has no num_features", "into")
        self.expect(where, "features", self.features, features, f"the features of {self.into}")
        self.expect(where, "param_delta", self.param_delta, 0, "a move")

    def apply(self, model: nn.Module, context: ApplyContext) -> None:
        act = model.get_submodule(self.target)
        replace_module(model, self.target, nn.Identity())
        replace_module(model, self.into, branch_end_module(model.get_submodule(self.into), act, None))


@dataclass(frozen=True)
class InsertICAfter(Edit):
    """An IC block of dropout probability ``p`` after the moved activation at the end of branch
    ``target`` (layout ``conv-relu-ic``); a ``move-act`` edit into ``target`` comes with it."""

    action: ClassVar[str] = "insert-ic-after"
    phase: ClassVar[Phase] = Phase.ATTACH
    p: float

    def check(self, view: ModelView, where: str) -> None:
        end = self.module(view, self.target, where, "target")
        features = getattr(end, "num_features", None)
        if not isinstance(features, int):
            raise self.mismatch(where, f"{type(end).__name__} has no num_features", "target")
        self.expect(where, "features", self.features, features, f"the features of {self.target}")
        self.expect(where, "param_delta", self.param_delta, 2 * self.features, "an IC block's parameters")

    def apply(self, model: nn.Module, context: ApplyContext) -> None:
        branch_end = model.get_submodule(self.target)  # Sequential(norm, act) since the layout phase
        tensors = [*branch_end.parameters(), *branch_end.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        branch_end.add_module("ic", IC(self.features, self.p, device=device))


EDIT_KINDS: dict[str, type[Edit]] = {kind.action: kind for kind in (InsertIC, FoldNorm, ReplaceNormAct,
                                                                  RouteThroughModule, MoveAct, InsertICAfter)}


def _read_feature_dim(reader: Reader, key: str) -> int:
    value = reader.get(key, int)
    if value not in (1, -1):
        raise reader.error(f"expected 1 or -1, got {value}", key)
    return value


def _read_statistics(reader: Reader, key: str) -> Statistics | None:
    value = reader.data[key]
    return None if value is None else Statistics.from_dict(value, f"{reader.where}.{key}")


# How each edit field is read back; the fields of every kind are here.
_FIELD_READERS: dict[str, Callable[[Reader, str], Any]] = {
    "target": lambda r, k: r.get(k, str),
    "features": lambda r, k: r.count(k),
    "param_delta": lambda r, k: r.get(k, int),
    "detail": lambda r, k: r.get(k, str),
    "into": lambda r, k: r.get(k, str),
    "feature_dim": _read_feature_dim,
    "statistics": _read_statistics,
    "layers": lambda r, k: r.strings(k),
    "routed_class": lambda r, k: r.get(k, str, type(None)),
    "p": lambda r, k: r.probability(k),
}


def check_edits(edits: list[Edit], where: str = "edits") -> None:
    """Checks a list of edits needs without a model: no edit twice (two edits of one kind on one
    module, two folds into one layer, two activations moved into one branch end), and every
    ``insert-ic-after`` with its ``move-act``."""
    seen: dict[tuple[str, str], int] = {}
    moved = {e.into for e in edits if isinstance(e, MoveAct)}
    for i, edit in enumerate(edits):
        keys = [(_family(edit), edit.target)]
        if isinstance(edit, (FoldNorm, MoveAct)):
            keys.append((f"{_family(edit)} into", edit.into))
        for key in keys:
            if key in seen:
                raise ConversionError(f"malformed plan: {where}[{i}]: duplicates {where}[{seen[key]}] "
                                      f"({edit.action} {key[1]!r})")
            seen[key] = i
        if isinstance(edit, InsertICAfter) and edit.target not in moved:
            raise ConversionError(f"malformed plan: {where}[{i}]: insert-ic-after {edit.target!r} without a move-act "
                                  "into it")


def _family(edit: Edit) -> str:
    """Edits of one family on one module are duplicates (a norm is folded or replaced once)."""
    return "fold-norm" if isinstance(edit, FoldNorm) else edit.action
