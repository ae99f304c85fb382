"""``convert``: apply a plan to a model (fold, replace, attach IC blocks) and initialise it.

``apply`` works from the plan's data and the model alone (the plan names modules by path), so a
plan read back from JSON or a checkpoint converts a fresh model of the same architecture
exactly as the plan made from it would. A converted model records its options
(``icrewrite_options``) and its plan (``icrewrite_plan``, as ``Plan.to_dict()``).

Like ``torch.fx.experimental.optimization.fuse``, it works on a deep copy
(``clone_module``) unless ``inplace=True``. The model keeps its class and every weight layer its name; a BatchNorm
that is removed becomes ``nn.Identity`` (or its activation, for fused norm+act modules),
so module paths stay valid for timm's ``feature_info`` and ``pretrained_cfg``.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError
from ._clone import clone_module
from ._edits import ApplyContext, Phase, fold_bn_into
from ._init_stats import calibrate
from ._inputs import check_convert_arguments
from ._plan import Options, Plan, make_plan, options_of

__all__ = ["convert", "replay", "apply", "fold_bn_into", "options_of", "plan_of"]


def apply(model: nn.Module, the_plan: Plan) -> nn.Module:
    """Make the edits of ``the_plan`` on ``model`` in place, phase by phase (:class:`Phase`:
    folds, moved activations, reroutes, then IC blocks initialised as ``the_plan.options.init``
    says); every edit first reads what it needs from the model as it was (``prepare``). The plan
    is checked against the model before anything changes (``Plan.check``)."""
    the_plan.check(model, count_parameters=False)
    context = ApplyContext(dict(model.named_modules()), preserve=the_plan.options.init == "preserve")
    for edit in the_plan.edits:
        edit.prepare(model, context)
    for phase in Phase:
        for edit in the_plan.edits:
            if edit.phase == phase:
                edit.apply(model, context)
    return model


def convert(
    model: nn.Module,
    *,
    p: float = Options.p,
    init: str = Options.init,
    stem: bool = Options.stem,
    head: bool = Options.head,
    exclude: Iterable[str] | str = Options.exclude,
    layout: str = Options.layout,
    p_overrides: Mapping[str, float] | Iterable[Any] | str = Options.p_overrides,
    inplace: bool = False,
    calibration: Iterable | torch.Tensor | None = None,
    calibration_batches: int = 8,
    plan: Plan | None = None,
) -> nn.Module:
    """Rewrite ``model`` into an IC network; returns a model of the same class.

    Every weight layer (conv, linear, timm's own) gets an IC block on its input, except
    stem layers (``stem=False``), the classifier (``head=False``) and names matching
    ``exclude`` (fnmatch patterns or module prefixes). BatchNorms placed before an
    activation are folded into the weight layer that feeds them and removed.

    ``p`` is the dropout probability of each IC block; ``p_overrides`` (``{"layer4.*": 0.1,
    "fc": 0.0}``) gives the blocks of the weight layers matching a key (an fnmatch pattern or a
    module prefix, as in ``exclude``) another, the first matching key winning; 0 leaves the
    block a BatchNorm only.

    ``init="preserve"``: in eval mode the result computes the same function as ``model``;
    IC statistics come from ``calibration`` batches when given, else are derived data-free
    from the removed BatchNorms. ``init="fresh"``: standard BatchNorm initialisation.
    ``layout`` picks the paper's residual-unit ordering (``relu-ic-conv``, the default;
    ``ic-conv-relu`` and ``conv-relu-ic`` need ``init="fresh"``, see ``layouts.py``).
    ``model`` is untouched unless ``inplace=True``. Converting a converted model changes
    nothing; a partially converted one is an error.

    ``plan``: what ``icrewrite.plan(model, **options)`` returned for this model or for another
    of the same architecture (also through ``Plan.to_dict()``/``from_dict()``), to convert by
    it instead of tracing the model; its options apply.
    """
    calibration = check_convert_arguments(model, calibration=calibration, calibration_batches=calibration_batches)
    options = Options(p=p, p_overrides=p_overrides, init=init, stem=stem, head=head, exclude=exclude, layout=layout)
    if plan is not None:
        if not isinstance(plan, Plan):
            raise ConversionError(f"plan must be a Plan (Plan.from_dict reads a dict), got {type(plan).__name__}")
        if options not in (Options(), plan.options):
            raise ConversionError(f"convert got a plan made with {plan.options.to_dict()} and the options "
                                  f"{options.to_dict()}; give the options to plan() only")
        plan.check(model, count_parameters=True)
        options = plan.options
    if calibration is not None and options.init != "preserve":
        raise ConversionError("calibration sets statistics that preserve the function; it needs init='preserve'")
    target = model if inplace else clone_module(model)
    the_plan = plan if plan is not None else make_plan(target, options)
    return _convert_by(target, the_plan, calibration, calibration_batches)


def replay(model: nn.Module, the_plan: Plan, *, inplace: bool = False) -> nn.Module:
    """Convert ``model`` by a plan recorded for its architecture, as ``load`` does with the plan
    a checkpoint holds; returns the converted model (``model`` itself when ``inplace``).

    Unlike ``convert(model, plan=...)`` the parameter count is not compared with the plan's:
    a model whose weights were tied when it was planned (shared tensors count once) is rebuilt
    untied. The plan is checked against the model first (``Plan.check``); the weights loaded
    afterwards check the rest.
    """
    the_plan.check(model, count_parameters=False)
    return _convert_by(model if inplace else clone_module(model), the_plan)


def _convert_by(target: nn.Module, the_plan: Plan, calibration: Iterable | torch.Tensor | None = None,
                calibration_batches: int = 8) -> nn.Module:
    """Apply ``the_plan`` to ``target`` in place, calibrate, and record options and plan on it."""
    if the_plan.present and the_plan.count("insert-ic"):
        raise ConversionError(
            f"{the_plan.model} is partially converted: {len(the_plan.present)} weight layers already have IC "
            f"blocks and {the_plan.count('insert-ic')} do not (e.g. {the_plan.edits[-1].target}); convert the "
            "original model instead")
    if not the_plan.edits:
        return target
    apply(target, the_plan)
    if calibration is not None:
        calibrate(target, calibration, max_batches=calibration_batches)
    target.icrewrite_options = the_plan.options.to_dict()
    target.icrewrite_plan = the_plan.to_dict()
    return target


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a converted model was made by (``None`` for a model converted before plans were
    recorded, or not converted by icrewrite)."""
    recorded = getattr(model, "icrewrite_plan", None)
    return None if recorded is None else Plan.from_dict(recorded)
