"""``plan``: every edit a conversion would make, computed without changing the model.

A plan is made from the analysis (see ``_analyse.py``) and the user's options. It is data:
each edit names modules by their paths and carries every fact ``apply`` needs, so a plan
applies to any model of the same architecture, and ``Plan.to_dict()`` / ``Plan.from_dict()``
carry it through JSON (a checkpoint records the plan it was converted by). The edit kinds:

- :class:`InsertIC` (``insert-ic``): an IC block on the input of a weight layer, with where
  its data-free statistics come from (:class:`Statistics`);
- :class:`FoldNorm` (``fold-norm``): a BatchNorm before an activation, folded into the weight
  layer before it and replaced by ``nn.Identity``; :class:`ReplaceNormAct`
  (``replace-norm-act``) the same for timm's fused ``BatchNormAct2d``, replaced by its activation;
- :class:`RouteThroughModule` (``route-through-module``): an attention module that uses a weight
  layer's weight functionally, made to call it as a module so that its IC block runs
  (``_reroute.py``); done only when one of those layers gets an IC block;
- :class:`MoveAct` (``move-act``) and :class:`InsertICAfter` (``insert-ic-after``): the
  residual-unit layouts of ``_layouts.py``;

and notes for what is left as it was, with the reason (stem, head, excluded, kept BatchNorm).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from torch import nn

from .. import model_info
from ..errors import ConversionError
from ..layers import ICWeightLayer, check_probability
from ._analyse import Analysis, Layer, NormBeforeAct, analyse
from ._layouts import LAYOUTS, ResidualUnit, residual_units
from ._patterns import ACTIVATION_FUNCTIONS, ActivationRef, FunctionActivation, ModuleActivation
from ._reroute import Reroute, class_path, import_class

__all__ = ["Options", "Statistics", "Edit", "InsertIC", "FoldNorm", "ReplaceNormAct", "RouteThroughModule", "MoveAct",
           "InsertICAfter", "Note", "Plan", "plan", "make_plan", "SCHEMA_VERSION"]

INITS = ("preserve", "fresh")
SCHEMA_VERSION = 1  # of Plan.to_dict(); from_dict reads this version only


# --- reading serialised plans ------------------------------------------------------------------

class _Reader:
    """One JSON object of a serialised plan, read field by field. Every problem is a one-line
    ``ConversionError`` that says where it is (``edits[3].features``); the object must have
    exactly ``keys``."""

    def __init__(self, data: Any, where: str, keys: Iterable[str]) -> None:
        self.where = where
        if not isinstance(data, dict):
            raise self.error(f"expected an object, got {type(data).__name__}")
        keys = list(keys)
        missing = [k for k in keys if k not in data]
        unknown = [repr(k)[1:-1] if isinstance(k, str) else repr(k) for k in data if k not in keys]  # one line
        if missing or unknown:
            raise self.error("; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                       + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
        self.data = data

    def error(self, message: str, key: str | None = None) -> ConversionError:
        where = f"{self.where}.{key}" if key else self.where
        return ConversionError(f"malformed plan: {where}: {message}")

    def get(self, key: str, *types: type) -> Any:
        """The value of ``key``, of exactly one of ``types`` (so ``True`` is not an ``int``)."""
        value = self.data[key]
        if type(value) not in types:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise self.error(f"expected {names}, got {type(value).__name__}", key)
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """A list of strings, as a tuple."""
        values = self.get(key, list)
        if not all(type(v) is str for v in values):
            raise self.error("expected a list of strings", key)
        return tuple(values)

    def objects(self, key: str, read: Callable[[Any, str], Any]) -> list[Any]:
        """A list of objects, each read by ``read(data, where)``."""
        return [read(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(self.get(key, list))]


_CONSTANTS = (int, float, bool, str, type(None))


def _read_activation(data: Any, where: str) -> ActivationRef:
    """``{"module": path}`` or ``{"function": name, "args": [...], "kwargs": {...}}``."""
    if isinstance(data, dict) and "module" in data:
        return ModuleActivation(_Reader(data, where, ["module"]).get("module", str))
    reader = _Reader(data, where, ["function", "args", "kwargs"])
    function = reader.get("function", str)
    if function not in ACTIVATION_FUNCTIONS:
        raise reader.error(f"unknown activation function {function!r}", "function")
    args, kwargs = reader.get("args", list), reader.get("kwargs", dict)
    if not all(type(v) in _CONSTANTS for v in (*args, *kwargs.values())) or not all(type(k) is str for k in kwargs):
        raise reader.error("activation arguments must be numbers, booleans, strings or null, by name or position")
    return FunctionActivation(function, tuple(args), tuple(sorted(kwargs.items())))


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

    @classmethod
    def from_dict(cls, data: Any, where: str = "options") -> Options:
        """The options ``to_dict`` wrote; their values are checked as the constructor checks them."""
        reader = _Reader(data, where, [f.name for f in fields(cls)])
        return cls(p=reader.get("p", float, int), init=reader.get("init", str), stem=reader.get("stem", bool),
                   head=reader.get("head", bool), exclude=reader.strings("exclude"), layout=reader.get("layout", str))


@dataclass(frozen=True)
class Statistics:
    """Where an IC block's data-free statistics come from: its layer reads ``activation`` of
    the output of BatchNorm ``norm``. ``convert`` recomputes them from the model (that norm's
    affine, that activation) when it applies the plan, before any BatchNorm is folded."""

    norm: str
    activation: ActivationRef

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "activation": self.activation.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Statistics:
        reader = _Reader(data, where, ["norm", "activation"])
        return cls(reader.get("norm", str), _read_activation(reader.data["activation"], f"{where}.activation"))


@dataclass(frozen=True)
class Edit:
    """One change to the model: the fields every kind has. ``param_delta`` is exact (``verify``
    measures the same); ``action`` names the kind in ``print(plan)`` and in ``to_dict()``."""

    action: ClassVar[str]
    target: str  # module path
    features: int
    param_delta: int
    detail: str

    def module_paths(self) -> tuple[str, ...]:
        """Every module path the edit names, all of which the model must have."""
        return (self.target,)

    def to_dict(self) -> dict[str, Any]:
        """``{"action": ..., field: value, ...}`` with JSON types (lists for tuples)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"action": self.action, **{k: _json_value(v) for k, v in values.items()}}

    @staticmethod
    def from_dict(data: Any, where: str = "edit") -> Edit:
        """The edit ``to_dict`` wrote, of the kind its ``action`` names."""
        if not isinstance(data, dict):
            raise ConversionError(f"malformed plan: {where}: expected an object, got {type(data).__name__}")
        action = data.get("action")
        kind = _EDIT_KINDS.get(action) if isinstance(action, str) else None
        if kind is None:
            raise ConversionError(f"malformed plan: {where}: unknown action {action!r} (one of "
                                  f"{', '.join(_EDIT_KINDS)})")
        names = [f.name for f in fields(kind)]
        reader = _Reader(data, where, ["action", *names])
        return kind(**{name: _FIELD_READERS[name](reader, name) for name in names})


def _json_value(value: Any) -> Any:
    """An edit field's value as JSON data: tuples become lists, statistics their dict."""
    if isinstance(value, tuple):
        return list(value)
    return value.to_dict() if isinstance(value, Statistics) else value


@dataclass(frozen=True)
class InsertIC(Edit):
    """An IC block on the input of weight layer ``target``: ``features`` over ``feature_dim``
    (1 for ``(N, C, *)``, -1 for ``(*, C)``); ``statistics`` None: default statistics."""

    action: ClassVar[str] = "insert-ic"
    feature_dim: int
    statistics: Statistics | None

    def module_paths(self) -> tuple[str, ...]:
        if self.statistics is None:
            return (self.target,)
        paths = (self.target, self.statistics.norm)
        activation = self.statistics.activation
        return (*paths, activation.module) if isinstance(activation, ModuleActivation) else paths


@dataclass(frozen=True)
class FoldNorm(Edit):
    """BatchNorm ``target`` folded into the weight layer ``into`` and replaced by ``nn.Identity``."""

    action: ClassVar[str] = "fold-norm"
    into: str

    def module_paths(self) -> tuple[str, ...]:
        return self.target, self.into


@dataclass(frozen=True)
class ReplaceNormAct(FoldNorm):
    """A fused norm+act module ``target`` folded into ``into`` and replaced by its activation
    (and its dropout, when it has one)."""

    action: ClassVar[str] = "replace-norm-act"


@dataclass(frozen=True)
class RouteThroughModule(Edit):
    """Attention module ``target`` made to call its child weight layers ``layers`` as modules:
    it becomes ``routed_class`` (``"module:qualname"``) or, when that is None, gets timm's
    ``qkv_bias_separate = True``. ``features``: of the IC block on the attention input (0: none)."""

    action: ClassVar[str] = "route-through-module"
    layers: tuple[str, ...]
    routed_class: str | None

    def module_paths(self) -> tuple[str, ...]:
        return (self.target, *(f"{self.target}.{layer}" if self.target else layer for layer in self.layers))

    def reroute(self) -> Reroute:
        """The reroute ``_reroute.route`` applies, with the routed class imported."""
        routed = None if self.routed_class is None else import_class(self.routed_class)
        return Reroute(self.layers, self.features, self.detail, routed)


@dataclass(frozen=True)
class MoveAct(Edit):
    """The activation ``target`` after a residual add, moved into the branch after its end ``into``."""

    action: ClassVar[str] = "move-act"
    into: str

    def module_paths(self) -> tuple[str, ...]:
        return self.target, self.into


@dataclass(frozen=True)
class InsertICAfter(Edit):
    """An IC block after the moved activation at the end of branch ``target`` (layout ``conv-relu-ic``)."""

    action: ClassVar[str] = "insert-ic-after"


_EDIT_KINDS: dict[str, type[Edit]] = {kind.action: kind for kind in (InsertIC, FoldNorm, ReplaceNormAct,
                                                                   RouteThroughModule, MoveAct, InsertICAfter)}


def _read_feature_dim(reader: _Reader, key: str) -> int:
    value = reader.get(key, int)
    if value not in (1, -1):
        raise reader.error(f"expected 1 or -1, got {value}", key)
    return value


def _read_statistics(reader: _Reader, key: str) -> Statistics | None:
    value = reader.data[key]
    return None if value is None else Statistics.from_dict(value, f"{reader.where}.{key}")


# How each edit field is read back; the fields of every kind are here.
_FIELD_READERS: dict[str, Callable[[_Reader, str], Any]] = {
    "target": lambda r, k: r.get(k, str),
    "features": lambda r, k: r.get(k, int),
    "param_delta": lambda r, k: r.get(k, int),
    "detail": lambda r, k: r.get(k, str),
    "into": lambda r, k: r.get(k, str),
    "feature_dim": _read_feature_dim,
    "statistics": _read_statistics,
    "layers": lambda r, k: r.strings(k),
    "routed_class": lambda r, k: r.get(k, str, type(None)),
}


@dataclass(frozen=True)
class Note:
    """Something the conversion leaves as it was, and why."""

    target: str
    reason: str

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Note:
        reader = _Reader(data, where, ["target", "reason"])
        return cls(reader.get("target", str), reader.get("reason", str))


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
        """The plan ``to_dict`` wrote. A dict of another schema version, or one that is not
        exactly what ``to_dict`` writes, is refused with a one-line ``ConversionError``."""
        if not isinstance(data, dict) or "schema" not in data:
            raise ConversionError("not a plan: expected an object with a schema version, as Plan.to_dict() writes")
        if data["schema"] != SCHEMA_VERSION or type(data["schema"]) is not int:
            raise ConversionError(f"plan schema version {data['schema']!r} is not supported: this icrewrite reads "
                                  f"version {SCHEMA_VERSION}")
        reader = _Reader(data, "plan", ["schema", "model", "options", "params_before", "params_after", "param_delta",
                                        "edits", "notes", "present"])
        result = cls(model=reader.get("model", str), options=Options.from_dict(data["options"]),
                     params_before=reader.get("params_before", int), edits=reader.objects("edits", Edit.from_dict),
                     notes=reader.objects("notes", Note.from_dict), present=list(reader.strings("present")))
        for key in ("params_after", "param_delta"):
            if reader.get(key, int) != getattr(result, key):
                raise reader.error(f"{data[key]} does not add up with the edits ({getattr(result, key)})", key)
        return result

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


def _fold_edit(norm: NormBeforeAct, producer: nn.Module) -> FoldNorm:
    """The edit that folds ``norm`` into ``producer``: the norm's parameters go, and a
    producer without bias gains one."""
    features = norm.module.running_mean.numel()
    delta = -_params(norm.module) + (features if getattr(producer, "bias", None) is None else 0)
    assert norm.producer is not None  # a foldable norm has one
    if norm.fused_act:
        return ReplaceNormAct(norm.name, features, delta, f"folded into {norm.producer}, replaced by its "
                              f"{type(norm.module.act).__name__}", norm.producer)
    return FoldNorm(norm.name, features, delta, f"folded into {norm.producer}, replaced by Identity", norm.producer)


def _insert_edit(layer: Layer) -> InsertIC:
    """The edit that gives ``layer`` an IC block, with where its statistics come from."""
    source = f"statistics from {layer.source[0]}" if layer.source else "default statistics"
    where = "channels (dim 1)" if layer.feature_dim == 1 else "features (last dim)"
    if layer.routed_by is not None:
        source += f"; called as a module once {layer.routed_by} is rerouted"
    elif not layer.called:
        source += "; not seen in any trace"
    statistics = Statistics(*layer.source) if layer.source else None
    return InsertIC(layer.name, layer.features, 2 * layer.features, f"over {where}, {source}", layer.feature_dim,
                    statistics)


def _route_edits(edits: list[Edit], analysis: Analysis) -> list[RouteThroughModule]:
    """A ``route-through-module`` edit for each attention module whose rerouted layers get an IC block."""
    routed = {analysis.layers[e.target].routed_by for e in edits if isinstance(e, InsertIC)}
    return [RouteThroughModule(name, r.input_features, 2 * r.input_features, r.detail, r.layers,
                               None if r.routed_class is None else class_path(r.routed_class))
            for name, r in analysis.reroutes.items() if name in routed]


def plan(model: nn.Module, **options: Any) -> Plan:
    """List every edit ``convert(model, **options)`` would make; the model is not changed.

    Works on models built on the ``meta`` device. Options are those of ``convert``
    (``p``, ``init``, ``stem``, ``head``, ``exclude``, ``layout``).
    """
    return make_plan(model, Options(**options))


def make_plan(model: nn.Module, options: Options, analysis: Analysis | None = None) -> Plan:
    """:func:`plan` with its options made; ``analysis`` is ``analyse(model)`` when the caller
    already has it (the zoo sweep reports on the analysis too), else it is made here."""
    result = Plan(
        model=model_info.architecture(model),
        options=options,
        params_before=sum(p.numel() for p in model.parameters()),
    )
    recorded = getattr(model, "icrewrite_options", None)
    if recorded is not None:  # converted by icrewrite: converting again changes nothing
        result.present = [n for n, m in model.named_modules() if isinstance(m, ICWeightLayer)]
        result.notes.append(Note("<model>", f"already converted by icrewrite with {recorded}; nothing to do"))
        return result
    analysis = analysis if analysis is not None else analyse(model)
    heads = model_info.classifier_names(model)
    for norm in analysis.norms:
        if norm.foldable:
            result.edits.append(_fold_edit(norm, model.get_submodule(norm.producer)))
        else:
            result.notes.append(Note(norm.name, f"BatchNorm before an activation kept: {norm.reason}"))
    for layer in analysis.layers.values():
        reason = _skip_reason(layer, options, heads)
        if layer.has_ic:
            result.present.append(layer.name)
        elif reason:
            result.notes.append(Note(layer.name, reason))
        else:
            result.edits.append(_insert_edit(layer))
    result.edits.extend(_route_edits(result.edits, analysis))
    if options.layout != LAYOUTS[0]:
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
    result.edits[:] = [e for e in result.edits if not (isinstance(e, InsertIC) and e.target in entry)]
    result.notes.extend(Note(name, f"layout {layout}: reads the unit input, the IC sits at the end of the "
                                   "previous unit") for name in sorted(entry))
    for u in units:
        result.edits.append(MoveAct(u.act, u.features, 0, f"moved before the add, after {u.branch_end}",
                                    u.branch_end))
        if layout == "conv-relu-ic":
            result.edits.append(InsertICAfter(u.branch_end, u.features, 2 * u.features,
                                              "IC at the end of the branch, after the moved activation"))
