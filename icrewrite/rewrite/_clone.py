"""``clone_module``: a deep copy of a model, specialised for ``nn.Module`` trees.

``copy.deepcopy`` walks every module's internals generically (parameter and buffer dicts,
a dozen empty hook dicts per module); on timm models that costs as much as building the
model. This copy handles those containers directly and leaves everything else to
``copy.deepcopy`` with a shared memo, so shared tensors and modules stay shared in the copy.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["clone_module"]

_IMMUTABLE = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device})
_EMPTY_CONTAINERS = frozenset({dict, OrderedDict, set, list})


def _is_immutable(v: Any) -> bool:
    """Exact immutable types, and tuples of them (``kernel_size``, ``padding``): shared, not copied."""
    return type(v) in _IMMUTABLE or (type(v) is tuple and all(type(x) in _IMMUTABLE for x in v))


def clone_module(root: nn.Module) -> nn.Module:
    """A deep copy of ``root``: new modules, new parameter and buffer storage, same structure."""
    memo: dict[int, Any] = {}

    def tensor(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if type(t) not in (torch.Tensor, nn.Parameter):  # a subclass (lazy, quantised): its own copy semantics
            return copy.deepcopy(t, memo)
        if id(t) not in memo:
            data = t.detach().clone()
            memo[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
        return memo[id(t)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if getattr(type(m), "__deepcopy__", None) is not None or type(m.__dict__.get("_parameters")) is not dict:
            return copy.deepcopy(m, memo)  # a module that defines its own copy semantics
        new = m.__class__.__new__(m.__class__)
        memo[id(m)] = new
        state = {}
        for key, v in m.__dict__.items():
            if _is_immutable(v):  # most attributes: flags, sizes, names
                state[key] = v
            elif type(v) in _EMPTY_CONTAINERS and not v:  # most of the dozen hook dicts
                state[key] = type(v)()
            elif key in ("_parameters", "_buffers"):
                state[key] = {name: tensor(t) for name, t in v.items()}
            elif key == "_modules":
                state[key] = {name: None if child is None else module(child) for name, child in v.items()}
            elif isinstance(v, nn.Module):
                state[key] = module(v)
            else:
                state[key] = copy.deepcopy(v, memo)
        new.__dict__.update(state)
        return new

    return module(root)
