"""Trace a model into ``torch.fx`` graphs, one per *scope*, for analysis only.

The root module is traced with timm's leaf modules and autowrapped functions; weight
layers, norms, activations, pass-through layers and IC blocks are leaves too, so each
appears as one ``call_module`` node, in train mode as in eval mode. When tracing fails
inside a submodule (data-dependent control flow, say), that submodule becomes a leaf and
the trace is retried. Every leaf that holds weight layers of its own is then traced as a
scope of its own, recursively; a scope that cannot be traced at all is recorded with its
error and its children are tried one by one (containers such as ``nn.ModuleList`` have no
``forward`` and are only looked into). Nothing here changes the model: what a traced
``forward`` caches in plain attributes (proxies, in eval mode) is put back as it was (``_kept``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..compat import get_notrace_functions, is_notrace_module
from ..layers import IC, ICWeightLayer
from ..registry import is_activation_module, is_batchnorm, is_passthrough_module, is_weight_layer
from ._kept import attributes_kept

__all__ = ["Scope", "trace_scopes"]

# Retries with one more leaf each; a model needing more is treated as untraceable.
_MAX_LEAF_RETRIES = 64


@dataclass
class Scope:
    """A module traced on its own: ``graph`` is None when it could not be traced."""

    prefix: str  # module path of the scope's root ("" for the model itself)
    module: nn.Module
    graph: fx.Graph | None
    is_model_input: bool  # placeholders are the model's own inputs
    error: str | None = None
    leaves: set[str] = field(default_factory=set)  # extra leaves added on trace failure
    # Modules of this scope (weight layers, scopes) that read the model input directly.
    input_layers: set[str] = field(default_factory=set)

    def qualname(self, target: str) -> str:
        """Module path, in the whole model, of a ``call_module`` target of this scope."""
        return f"{self.prefix}.{target}" if self.prefix and target else (self.prefix or target)


class ICTracer(fx.Tracer):
    """FX tracer that keeps the modules icrewrite reasons about as single nodes."""

    def __init__(self, extra_leaves: set[str] | None = None) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.extra_leaves = extra_leaves or set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.extra_leaves:
            return True
        if isinstance(m, (IC, ICWeightLayer)) or is_weight_layer(m) or is_batchnorm(m) or is_activation_module(m):
            return True
        if is_passthrough_module(m):  # one node in train mode too (timm's DropPath traces to random ops there)
            return True
        if is_notrace_module(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        # fx.Tracer finds the name of a parameter or buffer by searching all of them on each
        # access, quadratic in the size of the model; names by id give the same nodes.
        self._tensor_names = {id(t): name for name, t in [*root.named_buffers(), *root.named_parameters()]}
        return super().trace(root, concrete_args)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        name = self._tensor_names.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> fx.node.Argument:
        name = self._tensor_names.get(id(a)) if isinstance(a, torch.Tensor) else None
        return super().create_arg(a) if name is None else self.create_node("get_attr", name, (), {})


def _trace_with_leaf_fallback(module: nn.Module, concrete_args: dict[str, Any] | None = None
                              ) -> tuple[fx.Graph | None, set[str], str | None]:
    """Trace ``module``; on failure make the innermost failing submodule a leaf and retry."""
    leaves: set[str] = set()
    for _ in range(_MAX_LEAF_RETRIES):
        tracer = ICTracer(leaves)
        try:
            return tracer.trace(module, concrete_args), leaves, None
        except Exception as exc:  # FX raises many types; any failure means "not traceable here"
            failing = [name for name, _ in tracer.module_stack.values() if name and name not in leaves]
            if not failing:
                return None, leaves, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            leaves.add(failing[-1])
    return None, leaves, "too many untraceable submodules"


def _holds_weight_layers(module: nn.Module) -> bool:
    return any(is_weight_layer(m) for m in module.modules())


def _input_readers(graph: fx.Graph, module: nn.Module) -> set[str]:
    """Submodules holding weight layers whose first input is computed from the scope's inputs
    by weight-free operations only (reshapes, padding, masks, norms): they see the raw input."""
    raw: set[fx.Node] = set()
    readers: set[str] = set()
    for node in graph.nodes:
        inputs = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if node.op != "placeholder" and not (inputs and all(n in raw for n in inputs)):
            continue
        if node.op == "call_module" and _holds_weight_layers(module.get_submodule(node.target)):
            readers.update([node.target] if node.args and node.args[0] in raw else [])
        else:
            raw.add(node)
    return readers


def _default_args(module: nn.Module) -> dict[str, Any]:
    """Defaults of ``forward``'s optional arguments: the model is called as ``model(x)``, so
    ``if mask is None:`` branches are traced as taken."""
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: p.default for p in params
            if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _is_container(module: nn.Module) -> bool:
    """``ModuleList``, ``ModuleDict`` and the like: no ``forward``, never called, nothing to trace."""
    return type(module).forward is nn.Module.forward


def trace_scopes(model: nn.Module) -> list[Scope]:
    """All scopes of ``model``: the model itself first, then every leaf that holds weight layers."""
    with attributes_kept(model):
        return _trace_scopes(model)


def _trace_scopes(model: nn.Module) -> list[Scope]:
    scopes: list[Scope] = []
    pending: list[tuple[str, nn.Module, bool]] = [("", model, True)]
    while pending:
        prefix, module, is_model_input = pending.pop(0)
        if _is_container(module):
            graph, leaves, error = None, set(), None
        else:
            graph, leaves, error = _trace_with_leaf_fallback(module, None if prefix else _default_args(module))
        scope = Scope(prefix, module, graph, is_model_input, error, leaves)
        scopes.append(scope)
        if graph is None:
            # Untraceable: try the children one by one. Which child reads the model input is
            # unknown; modules register their stem first, so the first child is taken to.
            children = [(name, child, is_model_input and i == 0)
                        for i, (name, child) in enumerate(module.named_children())]
        else:
            readers = _input_readers(graph, module) if is_model_input else set()
            submodules = dict(module.named_modules())
            children = [(name, submodules[name], name in readers)
                        for name in sorted({n.target for n in graph.nodes if n.op == "call_module"})]
        for name, child, reads_input in children:
            if is_weight_layer(child) and reads_input:
                scope.input_layers.add(scope.qualname(name))
            elif not is_weight_layer(child) and not isinstance(child, IC) and _holds_weight_layers(child):
                pending.append((scope.qualname(name), child, reads_input))
    return scopes
