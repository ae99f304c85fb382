"""icrewrite: rewrite timm models into Independent-Component (IC) networks.

    import timm, icrewrite
    model = timm.create_model("resnet50", pretrained=True)
    print(icrewrite.plan(model))          # what would change
    ic_model = icrewrite.convert(model)   # same class, same function in eval mode
    print(icrewrite.verify(model, ic_model, torch.randn(2, 3, 224, 224)))
"""
from __future__ import annotations

import importlib
from typing import Any

# The core is imported eagerly: ``icrewrite.plan`` / ``convert`` / ``verify`` name the
# functions, which shadow their modules of the same names (import those with ``from``).
from .convert import convert
from .errors import CheckpointError, ConversionError, ExportError, ICRewriteError
from .layers import IC
from .plan import Edit, Plan, plan
from .verify import Report, verify

__version__ = "0.1.0"

# Heavier concerns (checkpoint I/O, ONNX, training, statistics) load on first use.
_LAZY = {
    "save": "checkpoint",
    "load": "checkpoint",
    "export_onnx": "export",
    "ExportReport": "export",
    "finetune": "train",
    "stats": "independence",
    "StatsReport": "independence",
}

__all__ = ["IC", "plan", "Plan", "Edit", "convert", "verify", "Report", "ICRewriteError", "ConversionError", "CheckpointError", "ExportError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'icrewrite' has no attribute {name!r}")
