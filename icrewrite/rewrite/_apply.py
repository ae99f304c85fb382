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

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..errors import ConversionError
from ..layers import IC, attach_ic
from ._clone import clone_module
from ._init_stats import calibrate, site_moments
from ._inputs import check_convert_arguments
from ._layouts import branch_end_module
from ._plan import (FoldNorm, InsertIC, InsertICAfter, MoveAct, Options, Plan, ReplaceNormAct, RouteThroughModule,
                    make_plan)
from ._reroute import route

__all__ = ["convert", "replay", "apply", "fold_bn_into", "options_of", "plan_of"]


def _parent_name(target: str) -> tuple[str, str]:
    """``"layer1.0.bn1"`` -> ``("layer1.0", "bn1")``."""
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def replace_module(model: nn.Module, target: str, new: nn.Module) -> None:
    parent, name = _parent_name(target)
    setattr(model.get_submodule(parent), name, new)


@torch.no_grad()
def fold_bn_into(layer: nn.Module, norm: nn.Module) -> None:
    """Fold eval-mode BatchNorm ``norm`` that follows ``layer`` into ``layer``'s weight and bias."""
    args = (norm.running_mean, norm.running_var, norm.eps, getattr(norm, "weight", None), getattr(norm, "bias", None))
    if isinstance(layer, nn.Linear):
        weight, bias = fuse_linear_bn_weights(layer.weight, layer.bias, *args)
    else:
        transpose = isinstance(layer, nn.modules.conv._ConvTransposeNd)
        weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, *args, transpose=transpose)
    bias.requires_grad_(weight.requires_grad)  # a bias created from BatchNorm buffers would not train
    layer.weight, layer.bias = weight, bias


def _norm_replacement(norm: nn.Module, edit: FoldNorm) -> nn.Module:
    """What stands where a folded BatchNorm was: Identity, or a fused module's drop + act."""
    if not isinstance(edit, ReplaceNormAct):
        return nn.Identity()
    drop = getattr(norm, "drop", None)
    if isinstance(drop, nn.Module) and not isinstance(drop, nn.Identity):
        return nn.Sequential(dict(drop=drop, act=norm.act))  # keeps the names bn.drop, bn.act
    return norm.act


def _data_free_stats(model: nn.Module, the_plan: Plan) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """IC input mean and variance for layers that read act(BN(.)), from that BN's affine and
    the activation the plan names, both looked up in ``model`` (before anything is folded)."""
    sites = {}
    for edit in the_plan.edits:
        if not isinstance(edit, InsertIC) or edit.statistics is None:
            continue
        norm = model.get_submodule(edit.statistics.norm)
        if norm.running_mean.device.type == "meta" or norm.running_mean.numel() != edit.features:
            continue
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        mean = bias.detach() if bias is not None else torch.zeros_like(norm.running_mean)
        std = weight.detach() if weight is not None else torch.ones_like(norm.running_var)
        sites[edit.target] = (edit.statistics.activation.resolve(model), mean.float(), std.float())
    return site_moments(sites)


def _module_device(model: nn.Module, target: str) -> torch.device:
    """Device of a module's first parameter or buffer (CPU when it has none)."""
    tensors = [*model.get_submodule(target).parameters(), *model.get_submodule(target).buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


class _ICFactory:
    """New IC blocks, copied from one prototype per shape, device and dtype.

    A model has dozens of sites and few distinct shapes, and copying a block
    (``clone_module``) costs a third of constructing one (``BatchNorm.__init__`` and its
    resets). With ``identity``, prototypes are the identity in eval mode (``set_identity``
    with default statistics), so the sites with no statistics of their own need nothing more.
    """

    def __init__(self, p: float, identity: bool) -> None:
        self.p = p
        self.identity = identity
        self._prototypes: dict[tuple[Any, ...], IC] = {}

    def __call__(self, features: int, feature_dim: int, like: torch.Tensor, training: bool) -> IC:
        key = (features, feature_dim, like.device, like.dtype, training)
        if key not in self._prototypes:
            prototype = IC(features, self.p, feature_dim=feature_dim, device=like.device, dtype=like.dtype)
            if self.identity and like.device.type != "meta":
                prototype.set_identity()
            self._prototypes[key] = prototype.train(training)
        return clone_module(self._prototypes[key])


def apply(model: nn.Module, the_plan: Plan) -> nn.Module:
    """Make the edits of ``the_plan`` on ``model`` in place: folds, moved activations,
    reroutes, then IC blocks (initialised as ``the_plan.options.init`` says)."""
    opts = the_plan.options
    preserve = opts.init == "preserve"
    stats = _data_free_stats(model, the_plan) if preserve else {}
    modules = dict(model.named_modules())  # weight layers and norms: only the norms are replaced, once each
    for edit in the_plan.edits:
        if isinstance(edit, FoldNorm):
            norm = modules[edit.target]
            fold_bn_into(modules[edit.into], norm)
            replace_module(model, edit.target, _norm_replacement(norm, edit))
    ends_with_ic = {e.target: e for e in the_plan.edits if isinstance(e, InsertICAfter)}
    for edit in the_plan.edits:
        if isinstance(edit, MoveAct):
            act = model.get_submodule(edit.target)
            replace_module(model, edit.target, nn.Identity())
            after = ends_with_ic.get(edit.into)
            ic = IC(after.features, opts.p, device=_module_device(model, edit.into)) if after else None
            replace_module(model, edit.into, branch_end_module(model.get_submodule(edit.into), act, ic))
    new_ic = _ICFactory(opts.p, identity=preserve)
    for edit in the_plan.edits:
        if isinstance(edit, RouteThroughModule):
            attention = model.get_submodule(edit.target)
            ic = (new_ic(edit.features, -1, next(attention.parameters()), attention.training)
                  if edit.features else None)  # on the attention input, before its packed projection
            route(attention, edit.reroute(), ic)
    for edit in the_plan.edits:
        if isinstance(edit, InsertIC):
            layer = modules[edit.target]  # weight layers keep their place through the edits above
            ic = new_ic(edit.features, edit.feature_dim, next(layer.parameters()), layer.training)
            if edit.target in stats:
                ic.set_identity(*stats[edit.target])
            attach_ic(layer, ic)
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
    calibration = check_convert_arguments(model, p=p, exclude=exclude, calibration=calibration,
                                          calibration_batches=calibration_batches)
    options = Options(p=p, init=init, stem=stem, head=head, exclude=exclude, layout=layout)
    if plan is not None:
        if options not in (Options(), plan.options):
            raise ConversionError(f"convert got a plan made with {plan.options.to_dict()} and the options "
                                  f"{options.to_dict()}; give the options to plan() only")
        _check_model(plan, model, count_parameters=True)
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
    untied. Every module the plan names must exist; the weights loaded afterwards check the rest.
    """
    _check_model(the_plan, model, count_parameters=False)
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


def _check_model(given: Plan, model: nn.Module, *, count_parameters: bool) -> None:
    """A plan must be this model's: every module its edits name exists, and (``count_parameters``)
    the model has the parameter count the plan was made for."""
    params = sum(p.numel() for p in model.parameters())
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    missing = [path for edit in given.edits for path in edit.module_paths() if path not in names]
    if missing or (count_parameters and params != given.params_before):
        difference = f"no module {missing[0]}" if missing else f"{params:,} parameters"
        raise ConversionError(f"the plan was made for {given.model} with {given.params_before:,} parameters, "
                              f"not this model ({difference})")


def options_of(model: nn.Module) -> dict[str, Any] | None:
    """The options a converted model was made with (``None`` for a model icrewrite did not convert)."""
    return getattr(model, "icrewrite_options", None)


def plan_of(model: nn.Module) -> Plan | None:
    """The plan a converted model was made by (``None`` for a model converted before plans were
    recorded, or not converted by icrewrite)."""
    recorded = getattr(model, "icrewrite_plan", None)
    return None if recorded is None else Plan.from_dict(recorded)
