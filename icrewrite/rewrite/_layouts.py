"""Residual-unit layouts from the paper: where the IC block and the ReLU sit in a unit.

A *residual unit* is found in a traced graph as ``act(add(branch, shortcut))`` where
``act`` is an activation module (timm's ResNet ``act2``/``act3``, torchvision's ``relu``).
The three layouts, for a timm BasicBlock (``conv1 bn1 act1 conv2 bn2 (+) act2``):

- ``relu-ic-conv`` (default, the paper's best): nothing moves. Each weight layer has an
  IC block on its input and the BatchNorm before ``act1`` is folded away:
  ``IC conv1 ReLU IC conv2 BN2 (+) ReLU``; across units the order is ReLU -> IC -> Conv.
- ``ic-conv-relu``: the unit's last ReLU moves into the branch, before the add:
  ``x + [IC conv1 ReLU IC conv2 BN2 ReLU](x)``, so each unit reads IC -> Conv -> ReLU.
- ``conv-relu-ic``: as ``ic-conv-relu``, and the IC blocks move to the end of each stage:
  the unit's entry layers (``conv1``, the downsample conv) read the unit input directly and
  the branch ends with an IC block: ``x + [conv1 ReLU IC conv2 BN2 ReLU IC](x)``.

Moving a ReLU across the add changes the function, so the two non-default layouts are for
training from scratch (``init="fresh"``). The branch end (``bn2``) becomes a small
``nn.Sequential`` named ``norm``/``act``/``ic`` (state-dict keys ``layer1.0.bn2.norm.*``).
"""
from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..layers import IC
from ..registry import is_activation_module, is_weight_layer
from ._patterns import is_passthrough
from ._trace import Scope

__all__ = ["LAYOUTS", "ResidualUnit", "residual_units", "branch_end_module"]

LAYOUTS = ("relu-ic-conv", "ic-conv-relu", "conv-relu-ic")
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class ResidualUnit:
    act: str  # activation module applied after the add
    branch_end: str  # module whose output is the branch operand of the add
    features: int  # channels at the add
    entry_layers: tuple[str, ...]  # weight layers that read the unit's input


def _producer_chain(node: fx.Node) -> list[fx.Node]:
    """``node`` and its first-argument ancestors."""
    chain = [node]
    while chain[-1].args and isinstance(chain[-1].args[0], fx.Node):
        chain.append(chain[-1].args[0])
    return chain


def _unit(add: fx.Node, act: fx.Node, scope: Scope, modules: dict[str, nn.Module]) -> ResidualUnit | None:
    operands = [a for a in add.args if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    for branch, shortcut in (operands, operands[::-1]):
        end = branch
        while is_passthrough(end, modules):
            end = end.args[0]
        if end.op != "call_module" or is_weight_layer(modules[end.target]) or end is shortcut:
            continue
        shortcut_chain = set(_producer_chain(shortcut))
        unit_input = next((n for n in _producer_chain(end) if n in shortcut_chain), None)
        if unit_input is None:
            continue
        entry = tuple(sorted(scope.qualname(u.target) for u in unit_input.users
                             if u.op == "call_module" and is_weight_layer(modules[u.target])))
        features = getattr(modules[end.target], "num_features", None)
        if entry and features:
            return ResidualUnit(scope.qualname(act.target), scope.qualname(end.target), features, entry)
    return None


def residual_units(scope: Scope) -> list[ResidualUnit]:
    """Residual units ``act(add(branch, shortcut))`` in a traced scope."""
    if scope.graph is None:
        return []
    modules = dict(scope.module.named_modules())
    units = []
    for node in scope.graph.nodes:
        if node.op != "call_module" or not is_activation_module(modules[node.target]) or len(node.args) != 1:
            continue
        add = node.args[0]
        is_add = isinstance(add, fx.Node) and ((add.op == "call_function" and add.target in _ADDS)
                                               or (add.op == "call_method" and add.target in ("add", "add_")))
        if is_add and len(add.users) == 1:
            unit = _unit(add, node, scope, modules)
            if unit is not None:
                units.append(unit)
    return units


def branch_end_module(norm: nn.Module, act: nn.Module, ic: IC | None) -> nn.Sequential:
    """What replaces a unit's branch end: ``norm`` then the moved activation (then ``ic``).

    A zero ``gamma`` (timm zero-initialises each unit's last BatchNorm) followed by a ReLU
    passes no gradient to the branch at all, so it is reset to 1.
    Units add the shortcut in place (``x += shortcut``), which overwrites the branch output;
    a ReLU's backward reads its output, so it becomes ``nn.Threshold(0, 0)``, the same
    function with a backward that reads the input. Other activations are made out-of-place.
    """
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and not weight.is_meta and not weight.detach().any():
        with torch.no_grad():
            weight.fill_(1.0)  # zero-initialised gamma (timm's zero_init_last) + ReLU: no gradient would pass
    if type(act) is nn.ReLU:
        act = nn.Threshold(0.0, 0.0)
    elif getattr(act, "inplace", False):
        act = copy.copy(act)
        act.inplace = False
    parts = [("norm", norm), ("act", act)] + ([("ic", ic)] if ic is not None else [])
    return nn.Sequential(OrderedDict(parts))
