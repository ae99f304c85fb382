"""icrewrite: rewrite timm models into Independent-Component (IC) networks.

    import timm, icrewrite
    model = timm.create_model("resnet50", pretrained=True)
    print(icrewrite.plan(model))          # what would change
    ic_model = icrewrite.convert(model)   # same class, same function in eval mode
    print(icrewrite.verify(model, ic_model, torch.randn(2, 3, 224, 224)))

The package: ``layers`` (what a converted model contains), ``registry`` (what is recognised,
and how to add your own layers), ``rewrite`` (trace -> analyse -> plan -> apply -> verify),
and on top ``checkpoint``, ``deploy`` (folding, ONNX), ``train``, ``independence`` and ``cli``.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import _moved
from .errors import CheckpointError, ConversionError, ExportError, ICRewriteError
from .layers import IC
from .registry import (register_activation, register_norm, register_passthrough, register_reroute,
                       register_weight_layer)
from .rewrite import Edit, Note, Options, Plan, Report, Reroute, convert, plan, verify

__version__ = "0.1.0"

# Heavier concerns (checkpoint I/O, ONNX, training, statistics) load on first use.
_LAZY = {
    "save": "checkpoint",
    "load": "checkpoint",
    "export_onnx": "deploy",
    "ExportReport": "deploy",
    "finetune": "train",
    "compare": "train.compare",
    "validate": "train.validate",
    "Validation": "train.validate",
    "stats": "independence",
    "StatsReport": "independence",
}

__all__ = [
    "IC", "plan", "Plan", "Edit", "Note", "Options", "convert", "verify", "Report", "Reroute",
    "register_weight_layer", "register_norm", "register_activation", "register_passthrough", "register_reroute",
    "ICRewriteError", "ConversionError", "CheckpointError", "ExportError", "__version__", *_LAZY,
]

_moved.install()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'icrewrite' has no attribute {name!r}")
