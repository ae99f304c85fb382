"""The rewrite, one step per module; data flows one way:

``_trace`` (torch.fx graphs, one per scope) -> ``_analyse`` (weight layers, BatchNorm ->
activation patterns from ``_patterns``, attention reroutes from ``_reroute``, residual units
from ``_layouts``) -> ``_plan`` (the edits, as data: JSON in and out; each edit kind one class of
``_edits`` with its checks and its effect) -> ``_apply`` (the edits' phases in order; statistics
from ``_init_stats``) -> ``_verify`` (parameter and function parity).
What counts as a weight layer, norm or activation is ``icrewrite.registry``'s.
"""
from __future__ import annotations

from ._analyse import Analysis, Layer, NormBeforeAct, analyse
from ._apply import apply, convert, fold_bn_into, options_of, plan_of, replay
from ._clone import clone_module
from ._edits import ApplyContext, EditMismatch, Phase
from ._init_stats import activation_moments, calibrate, site_moments
from ._layouts import LAYOUTS, ResidualUnit, residual_units
from ._patterns import ActivationRef, FunctionActivation, ModuleActivation
from ._plan import (INITS, NOTE_KINDS, SCHEMA_VERSION, Edit, FoldNorm, InsertIC, InsertICAfter, MoveAct, Note, Options,
                    Plan, ReplaceNormAct, RouteThroughModule, Statistics, make_plan, matches, parse_p_override, plan)
from ._probe import LayerWatch, probe_weight_use
from ..registry import class_path
from ._reroute import Reroute, find_reroute, resolve_routed_class, route
from ._trace import Scope, trace_scopes
from ._verify import TOLERANCE, Report, eval_mode, modes_kept, output_tensors, verify

__all__ = [
    "trace_scopes", "Scope", "analyse", "Analysis", "Layer", "NormBeforeAct", "Reroute", "find_reroute", "route",
    "class_path", "resolve_routed_class", "LAYOUTS", "ResidualUnit", "residual_units", "plan", "make_plan", "Plan", "Edit",
    "InsertIC", "FoldNorm", "ReplaceNormAct", "RouteThroughModule", "MoveAct", "InsertICAfter", "Statistics",
    "ActivationRef", "ModuleActivation", "FunctionActivation", "Note", "NOTE_KINDS", "Options", "INITS", "SCHEMA_VERSION",
    "Phase", "ApplyContext", "EditMismatch", "matches", "parse_p_override",
    "convert", "replay", "apply", "fold_bn_into", "options_of", "plan_of", "clone_module", "activation_moments",
    "site_moments", "calibrate", "LayerWatch", "probe_weight_use", "verify", "Report", "TOLERANCE", "output_tensors", "eval_mode", "modes_kept",
]
