"""Names that moved between the torch and timm versions icrewrite supports, in one place.

Each entry says which versions need which path; the rest of the package imports these
names from here and never tests a version itself.
"""
from __future__ import annotations

# --- timm -------------------------------------------------------------------------------------
try:  # timm >= 1.0.17 exports the FX registry from timm.layers
    from timm.layers import get_notrace_functions, is_notrace_module, register_notrace_module
except ImportError:  # timm 1.0.9 - 1.0.16: timm.models._features_fx
    from timm.models._features_fx import get_notrace_functions, is_notrace_module, register_notrace_module

__all__ = ["get_notrace_functions", "is_notrace_module", "register_notrace_module"]
