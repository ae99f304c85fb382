"""``plan``: every edit a conversion would make, computed without changing the model.

A plan is made from the analysis (see ``_analyse.py``) and the user's options:
- ``insert-ic``: an IC block on the input of a weight layer;
- ``fold-norm``: a BatchNorm before an activation, folded into the weight layer before it
  and replaced by ``nn.Identity`` (``replace-norm-act`` for timm's fused ``BatchNormAct2d``,
  replaced by its activation);
- ``route-through-module``: an attention module that uses a weight layer's weight
  functionally, made to call it as a module so that its IC block runs (``_reroute.py``);
  done only when one of those layers gets an IC block;
and notes for what is left as it was, with the reason (stem, head, excluded, kept BatchNorm).
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .. import model_info
from ..errors import ConversionError
from ..layers import ICWeightLayer, check_probability
from ._analyse import Analysis, Layer, NormBeforeAct, analyse
from ._layouts import LAYOUTS, ResidualUnit, residual_units

__all__ = ["Options", "Edit", "Note", "Plan", "plan"]

INITS = ("preserve", "fresh")


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A field of :class:`Options`; its help and choices are what the command line shows."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class Options:
    """Conversion options, the one definition that ``convert``, ``plan`` and the command line
    (``icrewrite.cli.add_conversion_arguments``) derive from; ``to_dict()`` is what a converted
    model records."""

    p: float = _option(0.05, "dropout probability of each IC block")
    init: str = _option("preserve", "preserve: the same function in eval mode, IC statistics from the removed "
                                    "BatchNorms or calibration data; fresh: default BatchNorm statistics", INITS)
    stem: bool = _option(False, "also put IC blocks before layers that read the image")
    head: bool = _option(True, "put an IC block before the classifier")
    exclude: tuple[str, ...] = _option((), "leave layers matching these fnmatch patterns or module prefixes alone")
    layout: str = _option(LAYOUTS[0], "residual-unit ordering from the paper (the others move the unit's last ReLU "
                                      "before the add and need init fresh)", LAYOUTS)

    def __post_init__(self) -> None:
        check_probability(self.p)
        if self.init not in INITS:
            raise ConversionError(f"init must be one of {INITS}, got {self.init!r}")
        if self.layout not in LAYOUTS:
            raise ConversionError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout != LAYOUTS[0] and self.init == "preserve":
            raise ConversionError(f"layout {self.layout!r} moves a ReLU across the residual add, which changes the "
                                  "function; use it with init='fresh' (training from scratch)")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exclude": list(self.exclude)}


@dataclass(frozen=True)
class Edit:
    """One change to the model. ``param_delta`` is exact: ``verify`` measures the same."""

    # "insert-ic" | "fold-norm" | "replace-norm-act" | "move-act" | "insert-ic-after" | "route-through-module"
    action: str
    target: str  # module name
    features: int  # route-through-module: features of the IC block it adds on the attention input (0: none)
    param_delta: int
    detail: str
    into: str | None = None  # fold edits: the weight layer that absorbs the BatchNorm; move-act: the new place

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Note:
    """Something the conversion leaves as it was, and why."""

    target: str
    reason: str


@dataclass
class Plan:
    model: str
    options: Options
    params_before: int
    edits: list[Edit] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # weight layers that already have an IC block
    analysis: Analysis | None = field(default=None, repr=False, compare=False)

    @property
    def param_delta(self) -> int:
        return sum(e.param_delta for e in self.edits)

    @property
    def params_after(self) -> int:
        return self.params_before + self.param_delta

    def count(self, action: str) -> int:
        return sum(e.action == action for e in self.edits)

    def summary(self) -> str:
        folded = self.count("fold-norm") + self.count("replace-norm-act")
        pct = 100.0 * self.param_delta / max(self.params_before, 1)
        routes = [e for e in self.edits if e.action == "route-through-module"]
        inserts = self.count("insert-ic") + self.count("insert-ic-after") + sum(e.features > 0 for e in routes)
        line = (f"{self.model}: {_n(inserts, 'IC block')} to insert, {_n(folded, 'BatchNorm')} to "
                f"fold, {_n(len(self.notes), 'note')}; parameters {self.params_before:,} -> {self.params_after:,} "
                f"({self.param_delta:+,}, {pct:+.2f}%)")
        if routes:
            line += f"; {_n(len(routes), 'attention module')} rerouted to call weight layers as modules"
        if self.present:
            line += f"; {_n(len(self.present), 'weight layer')} already with IC blocks"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "options": self.options.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_delta": self.param_delta,
            "edits": [e.to_dict() for e in self.edits],
            "notes": [asdict(n) for n in self.notes],
            "present": list(self.present),
        }

    def __str__(self) -> str:
        rows = [(e.action, e.target, str(e.features), f"{e.param_delta:+,}", e.detail) for e in self.edits]
        rows += [("keep", n.target, "", "", n.reason) for n in self.notes]
        header = ("action", "module", "features", "params", "detail")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
        lines = [self.summary(), ""]
        for row in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        return "\n".join(line.rstrip() for line in lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _within(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _skip_reason(layer: Layer, options: Options, heads: set[str]) -> str | None:
    """Why ``layer`` gets no IC block under ``options``, or None."""
    for pattern in options.exclude:
        if fnmatch.fnmatchcase(layer.name, pattern) or _within(layer.name, {pattern}):
            return f"excluded by {pattern!r}"
    if not options.head and _within(layer.name, heads):
        return "classifier (head=False)"
    if not options.stem and layer.reads_model_input:
        return "stem: reads the model input (stem=False)"
    if layer.functional and not layer.called and layer.routed_by is None:
        return ("its weight is used functionally, never through the module: an IC block would not run (a reroute "
                "registered with icrewrite.register_reroute can make it a module call)")
    return None


def _params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters(recurse=False))


def _fold_edit(norm: NormBeforeAct, producer: nn.Module) -> Edit:
    """The edit that folds ``norm`` into ``producer``: the norm's parameters go, and a
    producer without bias gains one."""
    features = norm.module.running_mean.numel()
    delta = -_params(norm.module) + (features if getattr(producer, "bias", None) is None else 0)
    if norm.fused_act:
        return Edit("replace-norm-act", norm.name, features, delta,
                    f"folded into {norm.producer}, replaced by its {type(norm.module.act).__name__}", norm.producer)
    return Edit("fold-norm", norm.name, features, delta, f"folded into {norm.producer}, replaced by Identity",
                norm.producer)


def _route_edits(edits: list[Edit], analysis: Analysis) -> list[Edit]:
    """A ``route-through-module`` edit for each attention module whose rerouted layers get an IC block."""
    routed = {analysis.layers[e.target].routed_by for e in edits if e.action == "insert-ic"}
    return [Edit("route-through-module", name, reroute.input_features, 2 * reroute.input_features, reroute.detail)
            for name, reroute in analysis.reroutes.items() if name in routed]


def plan(model: nn.Module, **options: Any) -> Plan:
    """List every edit ``convert(model, **options)`` would make; the model is not changed.

    Works on models built on the ``meta`` device. Options are those of ``convert``
    (``p``, ``init``, ``stem``, ``head``, ``exclude``, ``layout``).
    """
    opts = options.pop("_options", None) or Options(**options)
    result = Plan(
        model=model_info.architecture(model),
        options=opts,
        params_before=sum(p.numel() for p in model.parameters()),
    )
    recorded = getattr(model, "icrewrite_options", None)
    if recorded is not None:  # converted by icrewrite: converting again changes nothing
        result.present = [n for n, m in model.named_modules() if isinstance(m, ICWeightLayer)]
        result.notes.append(Note("<model>", f"already converted by icrewrite with {recorded}; nothing to do"))
        return result
    result.analysis = analysis = analyse(model)
    heads = model_info.classifier_names(model)
    for norm in analysis.norms:
        if norm.foldable:
            producer = model.get_submodule(norm.producer)
            result.edits.append(_fold_edit(norm, producer))
        else:
            result.notes.append(Note(norm.name, f"BatchNorm before an activation kept: {norm.reason}"))
    for layer in analysis.layers.values():
        reason = _skip_reason(layer, opts, heads)
        if layer.has_ic:
            result.present.append(layer.name)
        elif reason:
            result.notes.append(Note(layer.name, reason))
        else:
            source = f"statistics from {layer.source[0]}" if layer.source else "default statistics"
            where = "channels (dim 1)" if layer.feature_dim == 1 else "features (last dim)"
            if layer.routed_by is not None:
                source += f"; called as a module once {layer.routed_by} is rerouted"
            elif not layer.called:
                source += "; not seen in any trace"
            result.edits.append(Edit("insert-ic", layer.name, layer.features, 2 * layer.features,
                                     f"over {where}, {source}"))
    result.edits.extend(_route_edits(result.edits, analysis))
    if opts.layout != LAYOUTS[0]:
        _plan_layout(result, [u for scope in analysis.scopes for u in residual_units(scope)])
    for where, message in analysis.notes:
        result.notes.append(Note(where, message))
    return result


def _plan_layout(result: Plan, units: list[ResidualUnit]) -> None:
    """Edits that move each unit's last activation into its branch (see ``layouts.py``)."""
    layout = result.options.layout
    if not units:
        raise ConversionError(f"layout {layout!r} applies to residual units act(branch + shortcut); "
                              f"{result.model} has none")
    entry = {name for u in units for name in u.entry_layers} if layout == "conv-relu-ic" else set()
    result.edits[:] = [e for e in result.edits if not (e.action == "insert-ic" and e.target in entry)]
    result.notes.extend(Note(name, f"layout {layout}: reads the unit input, the IC sits at the end of the "
                                   "previous unit") for name in sorted(entry))
    for u in units:
        result.edits.append(Edit("move-act", u.act, u.features, 0, f"moved before the add, after {u.branch_end}",
                                 u.branch_end))
        if layout == "conv-relu-ic":
            result.edits.append(Edit("insert-ic-after", u.branch_end, u.features, 2 * u.features,
                                     "IC at the end of the branch, after the moved activation"))
