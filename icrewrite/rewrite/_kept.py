"""Undo what running a model's Python code leaves in its modules' plain attributes.

Tracing and probing run a model's ``forward`` on proxies or ``meta`` tensors, and some
forwards cache what they compute in plain attributes: ConViT's ``GPSA.rel_indices`` (timm up
to 1.0.2x), the per-device ``attention_bias_cache`` dicts of timm's EfficientFormer and
LeViT attentions in eval mode. Left there, a ``torch.fx.Proxy`` or a ``meta`` tensor would
break the next real forward; :func:`attributes_kept` puts every plain attribute back as it was.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from torch import nn

__all__ = ["attributes_kept"]

# What every nn.Module keeps in its __dict__ (parameters, buffers, submodules, hooks, mode):
# the module's own state, not a cache.
_MODULE_STATE = frozenset(vars(nn.Module()))

Snapshot = dict[nn.Module, dict[str, tuple[Any, Any]]]


def _contents(value: Any) -> Any:
    """A shallow copy of a dict, list or set (a cache filled in place); None for anything else."""
    return copy.copy(value) if isinstance(value, (dict, list, set)) else None


def _snapshot(model: nn.Module) -> Snapshot:
    """Each module's plain attributes: the object and, for containers, a copy of what they hold."""
    return {m: {key: (value, _contents(value)) for key, value in vars(m).items() if key not in _MODULE_STATE}
            for m in model.modules()}


def _restore(before: Snapshot) -> None:
    """Put back every plain attribute in ``before``: added ones removed, replaced ones and the
    contents of containers filled in place restored (the container object itself is kept)."""
    for module, attributes in before.items():
        for key in [k for k in vars(module) if k not in _MODULE_STATE and k not in attributes]:
            delattr(module, key)
        for key, (value, contents) in attributes.items():
            if vars(module).get(key) is not value:
                setattr(module, key, value)
            if contents is not None:  # not compared: items may be tensors or proxies
                value.clear()
                value.update(contents) if isinstance(value, (dict, set)) else value.extend(contents)


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Run the body, then restore every module's plain attributes (not parameters, buffers,
    submodules or hooks) to what they were, whatever the body cached there."""
    before = _snapshot(model)
    try:
        yield
    finally:
        _restore(before)
