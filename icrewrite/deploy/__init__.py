"""Deployment: IC blocks folded into the weights they feed (``fold``), and ONNX export
verified in onnxruntime (``onnx``, which needs ``pip install 'icrewrite[onnx]'``)."""
from __future__ import annotations

import importlib
from typing import Any

from .fold import FoldReport, fold_ic

EXPORTERS = ("dynamo", "torchscript")  # torch's ONNX exporters, tried in this order by default

_LAZY = {"export_onnx": "onnx", "ExportReport": "onnx", "Parity": "onnx"}

__all__ = ["fold_ic", "FoldReport", "EXPORTERS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
