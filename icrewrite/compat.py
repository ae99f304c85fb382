"""Names and behaviours that differ between the torch and timm versions icrewrite supports, in one place.

Each entry says which versions need which path; the rest of the package imports these
names from here and never tests a version itself.
"""
from __future__ import annotations

import torch

__all__ = ["get_notrace_functions", "is_notrace_module", "register_notrace_module", "is_exporting"]

# =====================================================================================
# timm
# =====================================================================================

# --- FX leaf registry ------------------------------------------------------------------------
# timm >= 1.0.17: ``timm.layers`` exports it (``timm/layers/_fx.py``).
# timm 1.0.9 - 1.0.16: only ``timm.models`` (``timm/models/_features_fx.py``). Either way it is
# the registry timm's own FX feature extraction uses, so modules registered here are leaves there too.
try:
    from timm.layers import get_notrace_functions, is_notrace_module, register_notrace_module
except ImportError:  # timm < 1.0.17
    from timm.models import get_notrace_functions, is_notrace_module, register_notrace_module

# =====================================================================================
# torch
# =====================================================================================

# First torch release checked to report is_exporting() correctly under torch.compile.
_IS_EXPORTING_TRACED_RIGHT = (2, 14)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def is_exporting() -> bool:
    """``torch.compiler.is_exporting()``: True under ``torch.export`` (and exporters built on it),
    False under ``torch.compile`` and in eager mode.

    - torch 2.14 and later: ``torch.compiler.is_exporting()`` itself.
    - torch before 2.14 (seen on 2.11): Dynamo replaces every traced call of
      ``torch.compiler.is_exporting()`` by the constant ``True``, so it claims to export under
      ``torch.compile`` too. The flag behind it, ``torch.compiler._is_exporting_flag``, which
      ``torch.export`` sets and Dynamo reads as a guarded global, is read instead: the value the
      fixed versions return.
    """
    if _torch_version() >= _IS_EXPORTING_TRACED_RIGHT:
        return torch.compiler.is_exporting()
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)
