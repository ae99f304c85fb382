"""Find, in traced scopes, the facts a plan is made of.

- every weight layer: its input features, whether any graph calls it as a module,
  whether it reads the model's raw input (a stem layer), whether its weight is used
  functionally (``F.linear(x, self.qkv.weight)``), so an IC on its input would never run;
- every BatchNorm that feeds an activation (BN -> act, or a fused ``BatchNormAct2d``):
  whether it can be folded exactly into the weight layer that produces its input, or why not;
- for data-free initialisation: which weight layers read ``act(BN(.))`` directly;
- attention modules that use weight layers functionally but can be rerouted to call
  them as modules (``attention.py``), so those layers get IC blocks too.

Weight layers that no trace sees called (inside untraceable modules) are settled by one
forward pass on ``meta`` tensors (``probe.py``).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from ..layers import ICWeightLayer
from ..registry import (WEIGHT_FUNCTIONS, declared_features, features_unknown, is_batchnorm, is_foldable_into,
                        is_weight_layer)
from ._edits import tied_parameters
from ._patterns import ActivationRef, ModuleActivation, activation_of, fused_activation, through_passthrough
from ._probe import probe_weight_use
from ._reroute import Reroute, find_reroute
from ._trace import Scope, trace_scopes

__all__ = ["Layer", "NormBeforeAct", "Analysis", "analyse"]

@dataclass
class Layer:
    """A weight layer of the model, as the analysis sees it."""

    name: str
    module: nn.Module
    features: int  # 0 until the meta probe reads them (a layer registered without features)
    feature_dim: int
    called: bool = False  # its forward runs: a call_module node in some scope, or seen by the meta probe
    reads_model_input: bool = False
    functional: bool = False  # its parameters are read by get_attr (used outside its forward)
    has_ic: bool = False
    source: tuple[str, ActivationRef] | None = None  # (BatchNorm name, activation) when input = act(BN(.))
    routed_by: str | None = None  # not called as a module, until this attention module is rerouted


@dataclass
class NormBeforeAct:
    """A BatchNorm whose output feeds an activation."""

    name: str
    module: nn.Module
    producer: str | None  # the weight layer it folds into, when foldable
    fused_act: bool  # a norm+act module (BatchNormAct2d): replaced by its activation
    reason: str | None = None  # why it cannot be folded; None when it can

    @property
    def foldable(self) -> bool:
        return self.reason is None


@dataclass
class Analysis:
    layers: dict[str, Layer]
    norms: list[NormBeforeAct]
    scopes: list[Scope]
    notes: list[tuple[str, str, str]] = field(default_factory=list)  # (module, note kind, message)
    reroutes: dict[str, Reroute] = field(default_factory=dict)  # attention module -> its reroute


def _out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _fold_blocker(norm: nn.Module, producer: fx.Node, scope: Scope, modules: dict[str, nn.Module],
                  calls: Counter, attr_owners: set[str], norm_target: str, tied: dict[str, list[str]]) -> str | None:
    """Why ``norm`` (called on ``producer``) cannot be folded into it, or None when it can."""
    if producer.op != "call_module" or not is_weight_layer(modules.get(producer.target, nn.Identity())):
        return "its input is not produced by a weight layer"
    layer = modules[producer.target]
    name = scope.qualname(producer.target)
    if not is_foldable_into(layer):
        return f"{name} ({type(layer).__name__}) cannot absorb a BatchNorm exactly"
    if isinstance(layer, nn.modules.conv._ConvTransposeNd) and layer.groups > 1:
        return f"{name} is a grouped transposed convolution, whose weight layout the fold does not handle"
    if len(producer.users) != 1:
        return f"the output of {name} has other consumers"
    if calls[producer.target] != 1 or calls[norm_target] != 1:
        return f"{name} or the BatchNorm is called more than once"
    if producer.target in attr_owners or norm_target in attr_owners:
        return f"the parameters of {name} or the BatchNorm are used outside their module"
    if _out_features(layer) != norm.running_mean.numel():
        return f"{name} has {_out_features(layer)} outputs, the BatchNorm {norm.running_mean.numel()} features"
    if isinstance(layer, nn.Linear) and not isinstance(norm, nn.BatchNorm1d):
        return f"{type(norm).__name__} after Linear {name}"
    for module in (name, scope.qualname(norm_target)):
        if module in tied:
            return f"{tied[module][0]} (tied parameters), which a fold would untie"
    return None


def _weight_owner(node: fx.Node, scope: Scope) -> str | None:
    """The module whose parameter a weight function call applies (directly, or after weight-only
    ops such as standardisation), as a name in the whole model; None when it is not a parameter."""
    weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    pending, seen = [weight], set()
    while pending:
        current = pending.pop()
        if not isinstance(current, fx.Node) or current in seen or current.op in ("placeholder", "call_module"):
            continue
        seen.add(current)
        if current.op == "get_attr":
            return scope.qualname(current.target.rpartition(".")[0])
        pending.extend(current.all_input_nodes)
    return None


def _unregistered_weights(scope: Scope, layers: dict[str, Layer], modules: dict[str, nn.Module]
                          ) -> list[tuple[str, str, str]]:
    """Notes for modules that apply a weight of their own with ``F.conv*``/``F.linear`` in their
    forward but are no registered weight layer: they get no IC block, and the note says how to
    register them (a weight layer's weight used elsewhere is handled as ``functional``)."""
    notes: dict[str, str] = {}
    for node in scope.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_FUNCTIONS:
            continue
        owner = _weight_owner(node, scope)
        if owner is None or owner in layers or owner in notes:
            continue
        module = modules.get(owner[len(scope.prefix) + 1:] if scope.prefix else owner)
        if module is None or any(name == owner or owner.startswith(name + ".") for name in layers):
            continue
        cls = type(module)
        notes[owner] = (f"applies its own weight with {node.target.__name__} but {cls.__name__} is not a registered "
                        f"weight layer, so it gets no IC block; register it: "
                        f"icrewrite.register_weight_layer({cls.__module__}.{cls.__qualname__})")
    return [(owner, "unregistered-layer", message) for owner, message in notes.items()]


def _analyse_scope(scope: Scope, layers: dict[str, Layer], norms: list[NormBeforeAct],
                   tied: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """Mark the scope's weight layers and collect its BatchNorm -> activation patterns; returns
    notes for weights applied by modules that are no registered weight layer."""
    assert scope.graph is not None
    modules = dict(scope.module.named_modules())
    nodes = list(scope.graph.nodes)
    calls = Counter(n.target for n in nodes if n.op == "call_module")
    attr_owners = {n.target.rsplit(".", 1)[0] for n in nodes if n.op == "get_attr" and "." in n.target}
    for owner in attr_owners:
        if scope.qualname(owner) in layers:
            layers[scope.qualname(owner)].functional = True

    for node in nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        name = scope.qualname(node.target)
        if name in layers:
            layer = layers[name]
            layer.called = True
        elif is_batchnorm(module):
            fused = fused_activation(module)
            act_users = [(u, activation_of(u, modules, scope.qualname)) for u in through_passthrough(node, modules)]
            act_users = [(u, fn) for u, fn in act_users if fn is not None]
            if fused is None and not act_users:
                continue  # not before an activation: the paper keeps such BatchNorms
            producer = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            reason = (_fold_blocker(module, producer, scope, modules, calls, attr_owners, node.target, tied)
                      if producer is not None else "its input is not a graph value")
            norms.append(NormBeforeAct(name, module, None if reason else scope.qualname(producer.target),
                                       fused is not None, reason))
            # Data-free IC statistics for weight layers that read act(BN(.)) directly.
            outputs = [(node, ModuleActivation(f"{name}.act"))] if fused is not None else act_users
            for out, act in outputs:
                for user in through_passthrough(out, modules):
                    target = scope.qualname(user.target) if user.op == "call_module" else None
                    if target in layers:
                        layers[target].source = (name, act)
    return _unregistered_weights(scope, layers, modules)


def _probe_unseen(model: nn.Module, layers: dict[str, Layer]) -> list[tuple[str, str, str]]:
    """Settle, with one meta forward pass, whether the weight layers no trace saw are called,
    and read the input features of those registered without them.

    A layer whose forward runs gets its IC run right before its weight; one whose weight
    is only read by other code (``F.multi_head_attention_forward``) is functional. A layer
    whose features the pass cannot read is dropped (it gets no IC block), with a note.
    """
    unseen = [name for name, layer in layers.items() if not layer.called]
    unknown = [name for name, layer in layers.items() if not layer.features]
    usage = probe_weight_use(model, [*unseen, *unknown]) if unseen or unknown else None
    for name in unseen if usage is not None else ():
        layers[name].called = name in usage.called
        layers[name].functional |= name in usage.weight_used_outside
    notes = []
    for name in unknown:
        if usage is not None and name in usage.input_features:
            layers[name].features, layers[name].feature_dim = usage.input_features[name]
            continue
        why = ("the model does not run on a meta input" if usage is None else "its forward never ran"
               if name not in usage.called else "no conv/linear call in its forward reads its input's features")
        notes.append((name, "unknown-features", features_unknown(layers.pop(name).module, why)))
    return notes


def _find_reroutes(model: nn.Module, layers: dict[str, Layer], scopes: list[Scope]) -> dict[str, Reroute]:
    """Reroutes for the modules owning weight layers that no trace or probe saw called (their
    weight used functionally, or the probe could not run), where one reroute covers all of
    them; those layers are marked ``routed_by``."""
    uncalled: dict[str, set[str]] = defaultdict(set)
    for name, layer in layers.items():
        if not layer.called:
            uncalled[name.rpartition(".")[0]].add(name)
    if not uncalled:
        return {}
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for scope in scopes:
        for node in scope.graph.nodes if scope.graph is not None else ():
            if node.op == "call_module" and scope.qualname(node.target) in uncalled:
                calls[scope.qualname(node.target)].append(node)
    reroutes: dict[str, Reroute] = {}
    for owner, names in uncalled.items():
        reroute = find_reroute(model.get_submodule(owner), calls[owner])
        covered = {f"{owner}.{child}" if owner else child for child in reroute.layers} if reroute else set()
        if reroute is not None and names <= covered <= layers.keys():
            reroutes[owner] = reroute
            for name in names:
                layers[name].routed_by = owner
    return reroutes


def analyse(model: nn.Module) -> Analysis:
    """Trace ``model`` and collect its weight layers and BatchNorm -> activation patterns."""
    layers: dict[str, Layer] = {}
    for name, module in model.named_modules():
        if is_weight_layer(module):
            features, feature_dim = declared_features(module) or (0, 1)
            layers[name] = Layer(name, module, features, feature_dim, has_ic=isinstance(module, ICWeightLayer))
    scopes = trace_scopes(model)
    norms: list[NormBeforeAct] = []
    notes: list[tuple[str, str, str]] = []
    tied = tied_parameters(model)
    for scope in scopes:
        for name in scope.input_layers:
            layers[name].reads_model_input = True
        if scope.graph is not None:
            notes.extend(_analyse_scope(scope, layers, norms, tied))
        elif scope.error is not None:
            notes.append((scope.prefix or "<model>", "untraceable",
                          f"not traceable ({scope.error}); weight layers inside get IC, "
                          "BatchNorms inside are kept"))
    notes.extend(_probe_unseen(model, layers))
    return Analysis(layers, norms, scopes, notes, _find_reroutes(model, layers, scopes))
