"""``plan``: every edit a conversion would make, computed without changing the model.

A plan is made from the analysis (see ``_analyse.py``) and the user's options. It is data:
each edit names modules by their paths and carries every fact ``apply`` needs, so a plan
applies to any model of the same architecture, and ``Plan.to_dict()`` / ``Plan.from_dict()``
carry it through JSON (a checkpoint records the plan it was converted by). The edit kinds,
each one class of ``_edits.py`` with its checks and its effect:

- :class:`InsertIC` (``insert-ic``): an IC block on the input of a weight layer, with its own
  dropout ``p`` and where its data-free statistics come from (:class:`Statistics`);
- :class:`FoldNorm` (``fold-norm``): a BatchNorm before an activation, folded into the weight
  layer before it and replaced by ``nn.Identity``; :class:`ReplaceNormAct`
  (``replace-norm-act``) the same for timm's fused ``BatchNormAct2d``, replaced by its activation;
- :class:`RouteThroughModule` (``route-through-module``): an attention module that uses a weight
  layer's weight functionally, made to call it as a module so that its IC block runs
  (``_reroute.py``); done only when one of those layers gets an IC block;
- :class:`MoveAct` (``move-act``) and :class:`InsertICAfter` (``insert-ic-after``): the
  residual-unit layouts of ``_layouts.py``;

and notes for what is left as it was, each with a ``kind`` (:data:`NOTE_KINDS`) and the reason.
Schema 2 (this version) records each IC block's ``p`` and each note's kind; schema-1 plans
(icrewrite 0.1) are read too, their blocks getting the plan's ``p``.
"""
from __future__ import annotations

import copy
import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from .. import model_info
from ..errors import ConversionError
from ..layers import ICWeightLayer, check_probability
from ..registry import class_path
from ._analyse import Analysis, Layer, NormBeforeAct, analyse
from ._edits import (Edit, FoldNorm, InsertIC, InsertICAfter, ModelView, MoveAct, Reader, ReplaceNormAct,
                     RouteThroughModule, Statistics, check_edits, own_params)
from ._layouts import LAYOUTS, ResidualUnit, residual_units

__all__ = ["Options", "Statistics", "Edit", "InsertIC", "FoldNorm", "ReplaceNormAct", "RouteThroughModule", "MoveAct",
           "InsertICAfter", "Note", "NOTE_KINDS", "Plan", "plan", "make_plan", "SCHEMA_VERSION", "parse_p_override",
           "matches"]

INITS = ("preserve", "fresh")
SCHEMA_VERSION = 2  # of Plan.to_dict(); from_dict reads this version and version 1
READABLE_SCHEMAS = (1, 2)

# Why a weight layer or BatchNorm is left as it was; code matches these, never the reason's text.
NOTE_KINDS = (
    "stem",  # reads the model input (stem=False)
    "head",  # the classifier (head=False)
    "excluded",  # matched by exclude
    "functional-weight",  # its weight is used outside its forward, so an IC block would not run
    "kept-norm",  # a BatchNorm before an activation that cannot be folded
    "unregistered-layer",  # applies a weight of its own but is no registered weight layer
    "unknown-features",  # a layer registered without features= whose input features the analysis could not read
    "untraceable",  # a part of the model torch.fx cannot trace
    "layout-entry",  # conv-relu-ic: reads the unit input, its IC sits at the end of the previous unit
    "already-converted",  # the model was converted by icrewrite
)


def options_of(model: nn.Module) -> dict[str, Any] | None:
    """The options a converted model was made with (``None`` for a model icrewrite did not convert)."""
    return getattr(model, "icrewrite_options", None)


def matches(name: str, pattern: str) -> bool:
    """``name`` matches an ``exclude``/``p_overrides`` key: an fnmatch pattern or a module prefix."""
    return fnmatch.fnmatchcase(name, pattern) or name == pattern or name.startswith(pattern + ".")


def parse_p_override(text: str) -> tuple[str, float]:
    """``"PATTERN=P"`` (the command line's ``--p-override``) as ``(pattern, p)``."""
    pattern, sep, value = text.rpartition("=")
    try:
        p = float(value)
    except ValueError:
        p = math.nan
    if not sep or not pattern or not math.isfinite(p):
        raise ConversionError(f"a p override is PATTERN=P with P a number in [0, 1), got {text!r}")
    return pattern, check_probability(p)


def _p_overrides(value: Any) -> tuple[tuple[str, float], ...]:
    """``p_overrides`` as ``((pattern, p), ...)`` in order, from a mapping, pairs, ``"PATTERN=P"``
    strings, or one string of them separated by ``,`` or ``|`` (``"layer4.*=0.1|fc=0"``, the
    form compare's variant specs use for lists); each p checked, no pattern twice."""
    if isinstance(value, str):
        value = [part for part in re.split(r"[,|]", value) if part.strip()]
    items = list(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(items, Iterable):
        raise ConversionError(f"p_overrides takes a dict of pattern -> p, got {type(value).__name__}")
    result: list[tuple[str, float]] = []
    for item in items:
        pattern, p = parse_p_override(item) if isinstance(item, str) else (
            tuple(item) if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None))
        if not isinstance(pattern, str) or not pattern:
            raise ConversionError(f"p_overrides: expected PATTERN=P or (pattern, p), got {item!r}")
        result.append((pattern, _probability(p, f"p_overrides[{pattern!r}]")))
    patterns = [pattern for pattern, _ in result]
    if len(set(patterns)) != len(patterns):
        twice = next(p for p in patterns if patterns.count(p) > 1)
        raise ConversionError(f"p_overrides: pattern {twice!r} given twice")
    return tuple(result)


def _probability(p: Any, name: str) -> float:
    """A dropout probability given by a user: a real number (not a bool or a string) in [0, 1)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise ConversionError(f"{name} must be a number in [0, 1), got {p!r}")
    return check_probability(p, name)


def _option(default: Any, help: str, choices: tuple[str, ...] | None = None, **cli: Any) -> Any:
    """A field of :class:`Options`; its help and choices are what the command line shows, ``cli``
    how it reads it when that is not derived from the default (``flag``, ``parse``, ``metavar``)."""
    return field(default=default, metadata={"help": help, "choices": choices, **cli})


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
    p_overrides: tuple[tuple[str, float], ...] = _option(
        (), "dropout probability for the weight layers matching PATTERN (an fnmatch pattern or module prefix, "
            "as --exclude); the first match wins", flag="--p-override", parse=parse_p_override, metavar="PATTERN=P")

    def __post_init__(self) -> None:
        _probability(self.p, "p")
        object.__setattr__(self, "p_overrides", _p_overrides(self.p_overrides))
        for name in ("stem", "head"):
            if type(getattr(self, name)) is not bool:
                raise ConversionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ConversionError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.layout, str) or self.layout not in LAYOUTS:
            raise ConversionError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout != LAYOUTS[0] and self.init == "preserve":
            raise ConversionError(f"layout {self.layout!r} moves a ReLU across the residual add, which changes the "
                                  "function; use it with init='fresh' (training from scratch)")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        exclude = tuple(exclude) if isinstance(exclude, Iterable) else None
        if exclude is None or not all(isinstance(e, str) for e in exclude):
            raise ConversionError(f"exclude takes fnmatch patterns or module prefixes (strings), got {self.exclude!r}")
        object.__setattr__(self, "exclude", exclude)

    def p_for(self, name: str) -> float:
        """The dropout probability of the IC block of module ``name``: that of the first
        ``p_overrides`` key it matches, else ``p``."""
        return next((p for pattern, p in self.p_overrides if matches(name, pattern)), self.p)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exclude": list(self.exclude), "p_overrides": dict(self.p_overrides)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "options") -> Options:
        """The options ``to_dict`` wrote (``p_overrides`` may be absent: options recorded before it
        existed); their values are checked as the constructor checks them."""
        reader = Reader(data, where, [f.name for f in fields(cls)], optional=["p_overrides"])
        overrides = reader.get("p_overrides", dict) if "p_overrides" in data else {}
        for pattern in overrides:
            Reader({"p": overrides[pattern]}, f"{where}.p_overrides[{pattern!r}]", ["p"]).probability("p")
        return cls(p=reader.probability("p"), init=reader.get("init", str), stem=reader.get("stem", bool),
                   head=reader.get("head", bool), exclude=reader.strings("exclude"), layout=reader.get("layout", str),
                   p_overrides=overrides)


@dataclass(frozen=True)
class Note:
    """Something the conversion leaves as it was: its ``kind`` (one of :data:`NOTE_KINDS`, what
    code matches) and the reason in words (what people read)."""

    target: str
    kind: str
    reason: str

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Note:
        reader = Reader(data, where, ["target", "kind", "reason"])
        if reader.get("kind", str) not in NOTE_KINDS:
            raise reader.error(f"unknown kind {data['kind']!r} (one of {', '.join(NOTE_KINDS)})", "kind")
        return cls(reader.get("target", str), data["kind"], reader.get("reason", str))


# Schema 1 notes had no kind; their reasons began with these words (icrewrite 0.1, fixed).
_SCHEMA_1_KINDS = (("excluded by ", "excluded"), ("classifier (head=False)", "head"), ("stem: ", "stem"),
                   ("its weight is used functionally", "functional-weight"),
                   ("BatchNorm before an activation kept", "kept-norm"),
                   ("already converted by icrewrite", "already-converted"),
                   ("layout ", "layout-entry"), ("applies its own weight with ", "unregistered-layer"),
                   ("not traceable (", "untraceable"))


def _from_schema_1(data: dict[str, Any], options: Options) -> dict[str, Any]:
    """A schema-1 plan dict as schema 2: every IC block gets the plan's ``p``, every note the
    kind its reason names. What is malformed is left for the schema-2 reader to report."""
    data = copy.deepcopy(data)
    for edit in data["edits"] if isinstance(data.get("edits"), list) else ():
        if isinstance(edit, dict) and edit.get("action") in ("insert-ic", "insert-ic-after", "route-through-module"):
            edit.setdefault("p", options.p)
    for note in data["notes"] if isinstance(data.get("notes"), list) else ():
        if isinstance(note, dict) and isinstance(note.get("reason"), str):
            kind = next((k for prefix, k in _SCHEMA_1_KINDS if note["reason"].startswith(prefix)), None)
            if kind is not None:
                note.setdefault("kind", kind)
    if isinstance(data.get("options"), dict):
        data["options"] = {**data["options"], "p_overrides": {}}
    data["schema"] = SCHEMA_VERSION
    return data


@dataclass
class Plan:
    """Every edit a conversion makes and every weight layer it leaves, with the options it was
    made with: data only (module paths, numbers, strings), so equal plans compare equal and
    ``from_dict(to_dict())`` gives the plan back. ``convert(model, plan=...)`` applies it."""

    model: str
    options: Options
    params_before: int
    edits: list[Edit] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # weight layers that already have an IC block

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
        """The plan as JSON-ready data, with its schema version (``params_after`` and
        ``param_delta`` are derived, for readers of the file)."""
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "options": self.options.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "param_delta": self.param_delta,
            "edits": [e.to_dict() for e in self.edits],
            "notes": [asdict(n) for n in self.notes],
            "present": list(self.present),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """The plan ``to_dict`` wrote, of schema 2 or 1. A dict of another schema version, or one
        that is not exactly what ``to_dict`` writes, is refused with a one-line ``ConversionError``
        naming the field; nothing named in it is imported or built."""
        if not isinstance(data, dict) or "schema" not in data:
            raise ConversionError("not a plan: expected an object with a schema version, as Plan.to_dict() writes")
        if type(data["schema"]) is not int or data["schema"] not in READABLE_SCHEMAS:
            raise ConversionError(f"plan schema version {data['schema']!r} is not supported: this icrewrite reads "
                                  f"versions {', '.join(map(str, READABLE_SCHEMAS))}")
        options = Options.from_dict(data.get("options"), "plan.options") if "options" in data else None
        if data["schema"] == 1 and options is not None:
            data = _from_schema_1(data, options)
        reader = Reader(data, "plan", ["schema", "model", "options", "params_before", "params_after", "param_delta",
                                       "edits", "notes", "present"])
        result = cls(model=reader.get("model", str), options=options, params_before=reader.count("params_before"),
                     edits=reader.objects("edits", Edit.from_dict), notes=reader.objects("notes", Note.from_dict),
                     present=list(reader.strings("present")))
        for key in ("params_after", "param_delta"):
            if reader.get(key, int) != getattr(result, key):
                raise reader.error(f"{data[key]} does not add up with the edits ({getattr(result, key)})", key)
        check_edits(result.edits, "plan.edits")
        return result

    def check(self, model: nn.Module, *, count_parameters: bool = True) -> None:
        """Refuse, in one line, a plan that does not fit ``model``: a module it names is missing,
        (``count_parameters``) the parameter count differs from the one it was made for, or an
        edit does not fit its module (kind of module, features, parameters, ties). Nothing is
        built or allocated; ``convert(plan=...)`` and ``replay`` call it first."""
        view = ModelView.of(model)
        params = sum(p.numel() for p in model.parameters())
        missing = [path for edit in self.edits for path in edit.module_paths() if path not in view.modules]
        if missing or (count_parameters and params != self.params_before):
            difference = f"no module {missing[0]!r}" if missing else f"{params:,} parameters"
            raise ConversionError(f"the plan was made for {self.model} with {self.params_before:,} parameters, "
                                  f"not this model ({difference})")
        check_edits(self.edits)
        for i, edit in enumerate(self.edits):
            edit.check(view, f"edits[{i}]")

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


def _skip_reason(layer: Layer, options: Options, heads: set[str]) -> tuple[str, str] | None:
    """Why ``layer`` gets no IC block under ``options``, as ``(kind, reason)``, or None."""
    for pattern in options.exclude:
        if matches(layer.name, pattern):
            return "excluded", f"excluded by {pattern!r}"
    if not options.head and any(matches(layer.name, head) for head in heads):
        return "head", "classifier (head=False)"
    if not options.stem and layer.reads_model_input:
        return "stem", "stem: reads the model input (stem=False)"
    if layer.functional and not layer.called and layer.routed_by is None:
        return "functional-weight", ("its weight is used functionally, never through the module: an IC block would "
                                     "not run (a reroute registered with icrewrite.register_reroute can make it a "
                                     "module call)")
    return None


def _fold_edit(norm: NormBeforeAct, producer: nn.Module) -> FoldNorm:
    """The edit that folds ``norm`` into ``producer``: the norm's parameters go, and a
    producer without bias gains one."""
    features = norm.module.running_mean.numel()
    delta = -own_params(norm.module) + (features if getattr(producer, "bias", None) is None else 0)
    assert norm.producer is not None  # a foldable norm has one
    if norm.fused_act:
        return ReplaceNormAct(norm.name, features, delta, f"folded into {norm.producer}, replaced by its "
                              f"{type(norm.module.act).__name__}", norm.producer)
    return FoldNorm(norm.name, features, delta, f"folded into {norm.producer}, replaced by Identity", norm.producer)


def _with_p(detail: str, p: float, options: Options) -> str:
    """An IC edit's detail, with its ``p`` when an override gives it another than the plan's."""
    return detail if p == options.p else f"{detail}; p={p}"


def _insert_edit(layer: Layer, options: Options) -> InsertIC:
    """The edit that gives ``layer`` an IC block, with where its statistics come from."""
    source = f"statistics from {layer.source[0]}" if layer.source else "default statistics"
    where = "channels (dim 1)" if layer.feature_dim == 1 else "features (last dim)"
    if layer.routed_by is not None:
        source += f"; called as a module once {layer.routed_by} is rerouted"
    elif not layer.called:
        source += "; not seen in any trace"
    statistics = Statistics(*layer.source) if layer.source else None
    p = options.p_for(layer.name)
    return InsertIC(layer.name, layer.features, 2 * layer.features, _with_p(f"over {where}, {source}", p, options),
                    layer.feature_dim, statistics, p)


def _route_edits(edits: list[Edit], analysis: Analysis, options: Options) -> list[RouteThroughModule]:
    """A ``route-through-module`` edit for each attention module whose rerouted layers get an IC block."""
    routed = {analysis.layers[e.target].routed_by for e in edits if isinstance(e, InsertIC)}
    return [RouteThroughModule(name, r.input_features, 2 * r.input_features,
                               _with_p(r.detail, options.p_for(name), options) if r.input_features else r.detail,
                               r.layers, None if r.routed_class is None else class_path(r.routed_class),
                               options.p_for(name))
            for name, r in analysis.reroutes.items() if name in routed]


def plan(model: nn.Module, **options: Any) -> Plan:
    """List every edit ``convert(model, **options)`` would make; the model is not changed.

    Works on models built on the ``meta`` device. Options are those of ``convert``
    (``p``, ``p_overrides``, ``init``, ``stem``, ``head``, ``exclude``, ``layout``).
    """
    return make_plan(model, Options(**options))


def make_plan(model: nn.Module, options: Options, analysis: Analysis | None = None) -> Plan:
    """:func:`plan` with its options made; ``analysis`` is ``analyse(model)`` when the caller
    already has it (the zoo sweep reports on the analysis too), else it is made here."""
    if not isinstance(model, nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, got {type(model).__name__}")
    result = Plan(
        model=model_info.architecture(model),
        options=options,
        params_before=sum(p.numel() for p in model.parameters()),
    )
    recorded = options_of(model)
    if recorded is not None:  # converted by icrewrite: converting again changes nothing
        result.present = [n for n, m in model.named_modules() if isinstance(m, ICWeightLayer)]
        result.notes.append(Note("<model>", "already-converted",
                                 f"already converted by icrewrite with {recorded}; nothing to do"))
        return result
    analysis = analysis if analysis is not None else analyse(model)
    heads = model_info.classifier_names(model)
    for norm in analysis.norms:
        if norm.foldable:
            result.edits.append(_fold_edit(norm, model.get_submodule(norm.producer)))
        else:
            result.notes.append(Note(norm.name, "kept-norm", f"BatchNorm before an activation kept: {norm.reason}"))
    for layer in analysis.layers.values():
        skip = _skip_reason(layer, options, heads)
        if layer.has_ic:
            result.present.append(layer.name)
        elif skip:
            result.notes.append(Note(layer.name, *skip))
        else:
            result.edits.append(_insert_edit(layer, options))
    result.edits.extend(_route_edits(result.edits, analysis, options))
    if options.layout != LAYOUTS[0]:
        _plan_layout(result, [u for scope in analysis.scopes for u in residual_units(scope)])
    for where, kind, message in analysis.notes:
        result.notes.append(Note(where, kind, message))
    return result


def _plan_layout(result: Plan, units: list[ResidualUnit]) -> None:
    """Edits that move each unit's last activation into its branch (see ``layouts.py``)."""
    options = result.options
    layout = options.layout
    if not units:
        raise ConversionError(f"layout {layout!r} applies to residual units act(branch + shortcut); "
                              f"{result.model} has none")
    entry = {name for u in units for name in u.entry_layers} if layout == "conv-relu-ic" else set()
    result.edits[:] = [e for e in result.edits if not (isinstance(e, InsertIC) and e.target in entry)]
    result.notes.extend(Note(name, "layout-entry", f"layout {layout}: reads the unit input, the IC sits at the end "
                                                   "of the previous unit") for name in sorted(entry))
    for u in units:
        result.edits.append(MoveAct(u.act, u.features, 0, f"moved before the add, after {u.branch_end}",
                                    u.branch_end))
        if layout == "conv-relu-ic":
            p = options.p_for(u.branch_end)
            result.edits.append(InsertICAfter(u.branch_end, u.features, 2 * u.features, _with_p(
                "IC at the end of the branch, after the moved activation", p, options), p))
