"""Does IC help this model on this data? A seeded, paired comparison of variants, with intervals.

``compare(model, train, test, out_dir, variants=["baseline", "ic", "ic:p=0.1"], seeds=3, epochs=...)``
trains every variant once per seed and reports, per variant, the mean and 95% t-interval over
seeds of its figures (accuracy, and the final model's NLL, ECE and Brier score, also under
MC dropout with ``mc_samples``) and, against the baseline, the paired difference with a
verdict in words; the verdicts of all variants and metrics are decided as one family by
Holm's step-down procedure (:mod:`.significance` does the statistics). Variants are
identified by their parsed options (:func:`parse_variants`).

The runs are paired: per seed the model is built once and every variant starts from it
(``convert`` copies it), and every variant's run uses that seed, which fixes the data order
and each sample's augmentation (:func:`.data.resumable_loader`). Each run is a
:func:`~icrewrite.finetune` run in ``out_dir/seed-S/VARIANT/``, so ``resume=True`` continues a
comparison after a crash: finished runs are read back, an unfinished one resumes from its
state. Time per step is not taken from the runs (trained at different times, they carry
whatever else the machine did meanwhile) but from a short timing phase per seed that steps the
variants round-robin on the same batches (:func:`.loop.time_steps`).

Writes ``out_dir/report.md``, ``compare.json`` (settings, every run's per-epoch records and
final evaluation, the timing rounds and the summary) and ``compare.png`` (test accuracy and
loss, mean +/- sd over seeds), atomically and as UTF-8, from rank 0 only under torchrun.
"""
from __future__ import annotations

import collections.abc
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import time
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import ICRewriteError
from ..files import atomic_path
from ..plot import plot_mean_std
from ..rewrite import Options, convert
from .loop import FinetuneConfig, finetune, format_record, is_primary, joined_world, time_steps
from .significance import (CONFIDENCE, Difference, Interval, epochs_to, holm, median_ratio, paired_difference,
                           t_interval)
from .validate import validate

__all__ = ["BASELINE", "Comparison", "ComparisonError", "Variant", "check_out_dir", "compare", "parse_variants"]

BASELINE = "baseline"
IC_VARIANT = "ic"
TIMING_FILE = "timing.json"
VARIANTS_FILE = "variants.json"  # the variants a comparison was started with, by key: a resume must give the same
Log = Callable[[str], None]
History = list[dict[str, float]]


class ComparisonError(ICRewriteError):
    """A comparison cannot be set up as asked (a bad variant, a folder in use)."""


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: the baseline model, or its IC conversion with ``options``.

    ``spec`` is what the user wrote; ``key`` is the variant's identity, the same for every
    spelling of the same options (``ic:p=0.1`` and ``ic:p=0.10``; ``ic`` and ``ic:init=fresh``).
    """

    spec: str
    options: Mapping[str, Any] | None = None  # convert's keyword arguments; None for the baseline

    @property
    def key(self) -> str:
        """The canonical spec: ``baseline``, or ``ic`` followed by the options that differ from an IC
        variant's defaults, in the order of :class:`~icrewrite.Options`, each value in one spelling."""
        if self.options is None:
            return BASELINE
        chosen, defaults = Options(**self.options), Options(**IC_DEFAULTS)
        items = [f"{f.name}={_spell(getattr(chosen, f.name))}" for f in dataclasses.fields(Options)
                 if getattr(chosen, f.name) != getattr(defaults, f.name)]
        return f"{IC_VARIANT}:{','.join(items)}" if items else IC_VARIANT

    @property
    def folder(self) -> str:
        """A file-name-safe form of ``key``: ``ic:p=0.1,layout=ic-conv-relu`` -> ``ic-p0.1-layoutic-conv-relu``;
        when that form loses characters (``exclude=a|b`` and ``exclude=a-b`` would meet), a short hash of the key
        follows, so that different variants never share a folder."""
        key = self.key
        readable = re.sub(r"[^A-Za-z0-9.]+", "-", key.replace("=", "")).strip("-")
        if re.fullmatch(r"[A-Za-z0-9.=:]+(?:[-,][A-Za-z0-9.=:]+)*", key):  # only ':', ',' and single '-' become '-'
            return readable
        return f"{readable}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def build(self, model: nn.Module) -> nn.Module:
        """This variant of ``model``, which is left as it is."""
        return copy.deepcopy(model) if self.options is None else convert(model, **self.options)


# IC variants start from default BatchNorm statistics: a comparison trains its models, and the other
# layouts need it. ``ic:init=preserve`` keeps a trained model's function instead.
IC_DEFAULTS = {"init": "fresh"}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _spell(value: Any) -> str:
    """One spelling of an option value in a spec: the inverse of :func:`_parse_value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "|".join(f"{k}={_spell(v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return "|".join(f"{v[0]}={_spell(v[1])}" if isinstance(v, (tuple, list)) else _spell(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _option_types() -> dict[str, Any]:
    """Each :class:`~icrewrite.Options` field's type, resolved from its annotation (the type of its
    default where an annotation cannot be resolved)."""
    try:
        hints = typing.get_type_hints(Options)
    except (NameError, TypeError):
        hints = {}
    return {f.name: hints.get(f.name, type(f.default)) for f in dataclasses.fields(Options)}


def _parse_value(kind: Any, text: str, where: str) -> Any:
    """``text`` as a value of type ``kind``: ``bool`` (true/false, 1/0, yes/no), a number, a string,
    an optional of one, ``tuple[X, ...]`` (``|`` between items), a pair ``tuple[K, V]`` (``K=V``) or a
    mapping (``K=V|K=V``, in order). ``where`` names the value in errors."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        kinds = [k for k in args if k is not type(None)]
        if text.lower() in ("none", "") and len(kinds) < len(args):
            return None
        return _parse_value(kinds[0], text, where) if len(kinds) == 1 else text
    if kind is bool:
        if text.lower() not in TRUE + FALSE:
            raise ComparisonError(f"{where} takes true or false, got {text!r}")
        return text.lower() in TRUE
    if origin in (dict, Mapping, collections.abc.Mapping) or kind in (dict, Mapping):
        key_kind, value_kind = args or (str, str)
        return dict(_parse_value(tuple[key_kind, value_kind], item, where) for item in filter(None, text.split("|")))
    if origin is tuple and len(args) == 2 and args[1] is not Ellipsis:
        key, equals, value = text.rpartition("=")
        if not equals or not key:
            raise ComparisonError(f"{where} takes PATTERN=VALUE items, got {text!r}")
        return _parse_value(args[0], key, where), _parse_value(args[1], value, where)
    if origin is tuple or kind is tuple:
        item_kind = args[0] if args else str
        return tuple(_parse_value(item_kind, item, where) for item in filter(None, text.split("|")))
    if kind in (int, float, str):
        try:
            return kind(text)
        except ValueError:
            raise ComparisonError(f"{where} takes a {kind.__name__}, got {text!r}") from None
    raise ComparisonError(f"{where} cannot be set in a variant spec (type {kind})")


def parse_variant(spec: str) -> Variant:
    """``baseline``, ``ic`` or ``ic:KEY=VALUE,...`` with each KEY a field of :class:`~icrewrite.Options`
    (``p``, ``init``, ``stem``, ``head``, ``exclude`` with ``|`` between patterns, ``layout``, and any field
    added there: its value is read by its type, a mapping as ``K=V|K=V``). Dashes in KEY may stand for
    underscores. A KEY given twice is an error."""
    spec = spec.strip()
    if spec == BASELINE:
        return Variant(spec)
    kind, _, settings = spec.partition(":")
    if kind != IC_VARIANT or (not settings and ":" in spec):
        raise ComparisonError(f"bad variant {spec!r}: use baseline, ic or ic:KEY=VALUE,... (e.g. ic:p=0.1)")
    option_types = _option_types()
    options: dict[str, Any] = dict(IC_DEFAULTS)
    given: set[str] = set()
    for item in filter(None, settings.split(",")):
        key, equals, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in option_types:
            raise ComparisonError(f"bad variant {spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                                  f"{', '.join(option_types)}")
        if key in given:
            raise ComparisonError(f"variant {spec!r}: {key} is given twice; give each option once")
        given.add(key)
        options[key] = _parse_value(option_types[key], text.strip(), f"variant {spec!r}: {key}")
    try:
        Options(**options)
    except ICRewriteError as err:
        raise ComparisonError(f"variant {spec!r}: {err}") from None
    return Variant(spec, options)


def _split_specs(specs: str) -> list[str]:
    """The specs of one ``--variants`` string: a ``KEY=VALUE`` item after an ``ic:...`` one continues it."""
    items: list[str] = []
    for item in specs.split(","):
        continues = "=" in item and ":" not in item and items and items[-1].startswith(f"{IC_VARIANT}:")
        items[-1:] = [f"{items[-1]},{item}"] if continues else [*items[-1:], item]
    return items


def parse_variants(specs: str | Sequence[str]) -> list[Variant]:
    """Variants from a list of specs or from one string such as ``"baseline,ic,ic:p=0.1,layout=ic-conv-relu"``
    (the CLI's ``--variants``): a ``KEY=VALUE`` item after an ``ic:...`` one continues it. The
    baseline must be among them; it goes first. Two specs with the same options (however spelled)
    are an error."""
    variants = [parse_variant(spec) for spec in (_split_specs(specs) if isinstance(specs, str) else specs)]
    if BASELINE not in (v.key for v in variants):
        raise ComparisonError("the variants must include baseline: every other variant is compared with it")
    seen: dict[str, str] = {}
    for variant in variants:
        if variant.key in seen:
            same = "" if seen[variant.key] == variant.spec else f" (the same options as {seen[variant.key]!r})"
            raise ComparisonError(f"variants given twice: {variant.spec}{same}")
        seen[variant.key] = variant.spec
    folders = [v.folder for v in variants]
    if len(set(folders)) < len(folders):  # only contrived patterns can still meet: refuse rather than share
        raise ComparisonError(f"variants {', '.join(v.spec for v in variants)} would share an output folder")
    return sorted(variants, key=lambda v: v.spec != BASELINE)


Evaluation = dict[str, float]  # a run's final model on the test data: what :func:`evaluate` returns


@dataclass(frozen=True)
class Metric:
    """A figure of a run: how the report names it, which way is better (None: descriptive, not
    tested against the baseline) and how to read it from the run's history and evaluation."""

    name: str
    column: str
    higher_is_better: bool | None
    digits: int
    key: str  # in the evaluation; "val_acc" and "best_val_acc" come from the history
    scale: float = 1.0  # the report's unit per unit of the evaluation (100: a fraction shown in points)

    def value(self, history: History, evaluation: Evaluation) -> float:
        if self.key == "val_acc":
            return history[-1]["val_acc"]
        if self.key == "best_val_acc":
            return max(r["val_acc"] for r in history)
        return self.scale * evaluation[self.key]


METRICS = (
    Metric("final test accuracy (points)", "final test acc (%)", True, 2, "val_acc"),
    # chosen on the test data, so optimistic: shown, not tested
    Metric("best test accuracy (points)", "best test acc (%)", None, 2, "best_val_acc"),
    Metric("NLL", "NLL", False, 4, "nll"),
    Metric("ECE (points)", "ECE (%)", False, 2, "ece", 100.0),
    Metric("Brier score", "Brier", False, 4, "brier"),
)
MC_METRICS = (
    Metric("MC-dropout test accuracy (points)", "MC acc (%)", True, 2, "mc_top1"),
    Metric("MC-dropout NLL", "MC NLL", False, 4, "mc_nll"),
    Metric("MC-dropout ECE (points)", "MC ECE (%)", False, 2, "mc_ece", 100.0),
    Metric("MC-dropout Brier score", "MC Brier", False, 4, "mc_brier"),
    Metric("MC-dropout predictive entropy (nats)", "MC entropy", None, 4, "mc_entropy"),
    Metric("MC-dropout mutual information (nats)", "MC MI", None, 4, "mc_mutual_information"),
)
PRIMARY = METRICS[0]


def evaluate(model: nn.Module, val_loader: DataLoader, mc_samples: int, seed: int) -> Evaluation:
    """NLL, ECE and Brier score of ``model`` on ``val_loader`` (:func:`.validate.validate`), and with
    ``mc_samples`` the same of the MC-dropout mean plus its accuracy, entropy and mutual information."""
    result = validate(model, val_loader, mc_samples=mc_samples, seed=seed)
    figures = {key: getattr(result.deterministic, key) for key in ("top1", "nll", "ece", "brier")}
    if result.mc is not None:
        figures.update({f"mc_{key}": getattr(result.mc, key)
                        for key in ("top1", "nll", "ece", "brier", "entropy", "mutual_information")})
    return figures


@dataclass(frozen=True)
class Summary:
    """A variant's figures over seeds (metric name -> interval); ``against_baseline`` (tested metrics
    only, with the family's verdicts) is empty for the baseline."""

    figures: dict[str, Interval]
    epochs_to_target: Interval | None  # over the runs that reached the target; None if none did
    reached: int
    step_ratio: Interval
    against_baseline: dict[str, Difference] = field(default_factory=dict)


@dataclass
class Comparison:
    """Every run's per-epoch records, final evaluation and timing rounds, by variant and seed, and what they show.

    The verdicts against the baseline form one family of paired tests (every IC variant on
    every tested metric), decided by Holm's step-down procedure (:func:`.significance.holm`):
    the chance that any of them calls a difference that is noise is at most 5 %.
    """

    out_dir: Path
    variants: list[str]
    histories: dict[str, list[History]]  # variant -> one history per seed
    step_seconds: dict[str, list[list[float]]]  # variant -> per seed, seconds per step of each timing round
    target: float
    settings: dict[str, Any]
    evaluations: dict[str, list[Evaluation]] = field(default_factory=dict)  # variant -> per seed
    mc_samples: int = 0

    @property
    def seeds(self) -> int:
        return len(self.histories[BASELINE])

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS + (MC_METRICS if self.mc_samples else ())

    @property
    def tested(self) -> tuple[Metric, ...]:
        return tuple(m for m in self.metrics if m.higher_is_better is not None)

    @property
    def family_size(self) -> int:
        """The number of paired tests whose verdicts are decided together."""
        return (len(self.variants) - 1) * len(self.tested)

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out_dir / f"seed-{seed}" / parse_variant(variant).folder

    def _per_seed(self, variant: str, metric: Metric) -> list[float]:
        return [metric.value(h, e) for h, e in zip(self.histories[variant], self.evaluations[variant])]

    def summaries(self) -> dict[str, Summary]:
        differences = holm({(variant, metric.name): paired_difference(
                                self._per_seed(variant, metric), self._per_seed(BASELINE, metric),
                                higher_is_better=metric.higher_is_better)
                            for variant in self.variants if variant != BASELINE for metric in self.tested})
        summaries = {}
        for variant in self.variants:
            reached = [e for e in (epochs_to(h, self.target) for h in self.histories[variant]) if e is not None]
            ratios = [median_ratio(s, b) for s, b in zip(self.step_seconds[variant], self.step_seconds[BASELINE])]
            summaries[variant] = Summary(
                {m.name: t_interval(self._per_seed(variant, m)) for m in self.metrics},
                t_interval(reached) if reached else None, len(reached), t_interval(ratios),
                {name: d for (v, name), d in differences.items() if v == variant})
        return summaries

    def verdicts(self) -> dict[str, str]:
        """Per IC variant, one sentence: its final test accuracy against the baseline's, then the
        other tested metrics it is better or worse on (all verdicts decided as one family)."""
        verdicts = {}
        for variant, s in self.summaries().items():
            if variant == BASELINE:
                continue
            resolved = {verdict: [m.name for m in self.tested[1:] if s.against_baseline[m.name].verdict == verdict]
                        for verdict in ("better", "worse")}
            others = "; ".join(f"{verdict}: {', '.join(names)}" for verdict, names in resolved.items() if names)
            verdicts[variant] = (f"{variant} against {BASELINE}, {PRIMARY.name}: "
                                 f"{s.against_baseline[PRIMARY.name].explain(PRIMARY.digits)}; "
                                 f"{others or 'no other tested metric resolved'}")
        return verdicts

    def family(self) -> str:
        """What the verdicts control, in one sentence."""
        return (f"Verdicts: Holm's step-down over the {self.family_size} paired tests ({len(self.variants) - 1} "
                f"variant(s) x {len(self.tested)} metrics), family-wise error {1 - CONFIDENCE:.0%}; intervals are "
                f"per comparison ({CONFIDENCE:.0%}).")

    def _table(self, metrics: Sequence[Metric], extra: bool) -> list[str]:
        n = self.seeds
        header = [m.column for m in metrics]
        header += [f"epochs to {self.target:g}%", "step time / baseline"] if extra else []
        lines = ["| variant | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
        for variant, s in self.summaries().items():
            cells = [s.figures[m.name].format(m.digits) for m in metrics]
            if extra:
                cells.append(f"{s.epochs_to_target.format(1)} ({s.reached}/{n} runs)" if s.epochs_to_target
                             else f"never (0/{n} runs)")
                cells.append("1 (reference)" if variant == BASELINE else s.step_ratio.format())
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        return lines

    def table(self) -> str:
        """Per variant, its figures over seeds: a Markdown table (and one for MC dropout when measured)."""
        lines = self._table(METRICS, extra=True)
        if self.mc_samples:
            lines += ["", *self._table(MC_METRICS, extra=False)]
        return "\n".join(lines)

    def report(self) -> str:
        """The Markdown of ``report.md``."""
        summaries, n = self.summaries(), self.seeds
        mc = (f" MC dropout: the mean of {self.mc_samples} passes over the test data with dropout active and "
              "BatchNorm in eval mode, of the final model." if self.mc_samples else "")
        lines = [f"# {self.settings['title']}", "", self.settings["description"], "",
                 f"{n} seed(s) per variant, paired: per seed every variant starts from the same initial weights "
                 f"and sees the same data order and augmentation. Figures are means over seeds with their "
                 f"{CONFIDENCE:.0%} t-interval [low, high]. NLL, ECE (15 equal-width confidence bins) and Brier "
                 f"score are those of the final model on the test data.{mc} Step time / baseline: per seed, the "
                 f"median over {self.settings['timing_rounds']} interleaved rounds (every variant one step on the "
                 "same batch per round) of the variant's step time over the baseline's in the same round; then its "
                 "mean and interval over seeds.", "",
                 self.table()]
        tested = self.tested
        lines += ["", f"Against the baseline: the paired difference (variant minus baseline, per seed) and its "
                      f"{CONFIDENCE:.0%} t-interval. {self.family()} A difference is better or worse only when "
                      "Holm's procedure rejects it, so an interval that excludes 0 can still be not resolved; the "
                      "seeds a difference would need are counted at the level "
                      f"{1 - CONFIDENCE:.0%} / {self.family_size}, at which a test is resolved whatever the others "
                      "show. The best test accuracy is chosen on the test data and is not tested.", "",
                  "| variant | " + " | ".join(m.name for m in tested) + " |", "|---|" + "---|" * len(tested)]
        for variant, s in summaries.items():
            if variant != BASELINE:
                lines.append(f"| {variant} | " + " | ".join(
                    s.against_baseline[m.name].explain(m.digits) for m in tested) + " |")
        lines += ["", "Verdicts:", "", *(f"- {v}" for v in self.verdicts().values()), "",
                  "![test accuracy and loss](compare.png)", "",
                  "Every run's per-epoch records and final evaluation are in `compare.json`; each run's files are "
                  "in `seed-S/VARIANT/` (a `finetune` run)."]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        summary = {v: {**_plain(dataclasses.asdict(s)), "figures": {k: _plain(dataclasses.asdict(i))
                                                                    for k, i in s.figures.items()}}
                   for v, s in self.summaries().items()}
        return {"settings": self.settings, "variants": self.variants, "target": self.target,
                "mc_samples": self.mc_samples, "family": self.family(), "runs": self.histories,
                "evaluations": self.evaluations, "step_seconds": self.step_seconds, "summary": summary}

    def write(self) -> None:
        """``report.md``, ``compare.json`` and ``compare.png`` in ``out_dir``, each written atomically (UTF-8)."""
        curves = {metric: {v: np.array([[r[key] for r in h] for h in hs]) for v, hs in self.histories.items()}
                  for metric, key in (("test accuracy (%), mean ± sd over seeds", "val_acc"),
                                      ("test loss, mean ± sd over seeds", "val_loss"))}
        plot_mean_std(curves, self.out_dir / "compare.png")
        with atomic_path(self.out_dir / "compare.json") as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        with atomic_path(self.out_dir / "report.md") as tmp:
            # a path given under a C locale holds surrogate escapes: written back as the bytes it came from
            tmp.write_text(self.report(), encoding="utf-8", errors="surrogateescape")


def _plain(value: Any) -> Any:
    """``value`` with NaN as ``None``, so that ``compare.json`` is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _quiet(_: str) -> None:
    """The log of every process but the first under torchrun."""


class _Bar:
    """One progress bar for a whole comparison: epochs done over all runs, the current seed, variant
    and epoch, and the time left (tqdm's estimate); on stderr. With ``verbose`` it also logs each
    stage and run and prints each epoch's line."""

    def __init__(self, total: int, epochs: int, *, show: bool, verbose: bool, log: Log) -> None:
        self.epochs, self.verbose, self.log, self.runs = epochs, verbose, log, 0
        self.bar = tqdm(total=total, desc="starting", unit="epoch", disable=not show, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs "
                                   "[{elapsed}<{remaining}{postfix}]")

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *_: object) -> None:
        self.bar.close()

    def stage(self, short: str, line: str) -> None:
        self.bar.set_description_str(short)
        self.bar.set_postfix_str("")
        if self.verbose:
            self.log(line)

    def epoch(self, record: Mapping[str, float]) -> None:
        self.bar.set_postfix_str(f"epoch {record['epoch']}/{self.epochs}, test acc {record['val_acc']:.1f}%")
        self.bar.update(1)
        if self.verbose:
            tqdm.write(format_record(dict(record), self.epochs))

    def run_done(self, line: str) -> None:
        """A run finished (or was read back finished): the bar counts all its epochs."""
        self.runs += 1
        self.bar.update(self.runs * self.epochs - self.bar.n)
        if self.verbose:
            self.log(line)


def check_out_dir(out_dir: Path, resume: bool, variants: Sequence[Variant] | None = None) -> None:
    """Refuse a folder in use unless the comparison in it is resumed, and a resume with other variants
    than the comparison in it was started with (``VARIANTS_FILE``, by their options)."""
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise ComparisonError(f"{out_dir} is not empty; resume the comparison in it or choose another output folder")
    recorded = out_dir / VARIANTS_FILE
    if resume and variants is not None and recorded.is_file():
        try:
            started = json.loads(recorded.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ComparisonError(f"cannot read {recorded}: {err}") from None
        if started != [v.key for v in variants]:
            raise ComparisonError(f"cannot resume {out_dir} with other variants: it was started with "
                                  f"{','.join(map(str, started))}, this asks for {','.join(v.key for v in variants)}; "
                                  "give the same variants or a new output folder")


def _step_seconds(models: dict[str, nn.Module], train_loader: DataLoader, path: Path, rounds: int, resume: bool,
                  options: dict[str, Any]) -> dict[str, list[float]]:
    """The timing rounds of one seed: read back from ``path`` on resume, else measured (and saved)."""
    if resume and path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if set(saved) == set(models):
            return saved
    seconds = time_steps(models, train_loader, rounds=rounds, **options)
    if is_primary():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(seconds), encoding="utf-8")
    return seconds


def compare(
    model: nn.Module | Callable[[], nn.Module],
    train_loader: DataLoader,
    val_loader: DataLoader,
    out_dir: str | os.PathLike,
    *,
    variants: str | Sequence[str] = (BASELINE, IC_VARIANT),
    seeds: int = 3,
    target: float = 95.0,
    timing_rounds: int = 20,
    mc_samples: int = 0,
    resume: bool = False,
    title: str = "Paired comparison over seeds",
    description: str = "",
    verbose: bool = False,
    log: Log = print,
    **finetune_options: Any,
) -> Comparison:
    """Train every variant of ``model`` once per seed ``0 .. seeds-1`` and write the comparison.

    ``model`` is a module (every seed starts from its weights) or a function that builds one
    (called once per seed after ``torch.manual_seed(seed)``: new initial weights per seed).
    ``variants``: see :func:`parse_variants`. ``target``: the test accuracy (%) for "epochs to
    target". Each run's final model is evaluated on ``val_loader`` (NLL, ECE, Brier score) and,
    with ``mc_samples`` N > 0, also as the mean of N MC-dropout passes. ``finetune_options`` go to
    every run (``epochs``, ``lr``, ...; the seed is the comparison's). ``out_dir`` must be empty or
    absent unless ``resume``. ``title`` and ``description`` (what was trained on what) head
    ``report.md``. Progress is one bar for the whole comparison (``progress=False``: none); with
    ``verbose`` also a line per run and per epoch (through ``log`` and ``tqdm.write``).
    """
    parsed = parse_variants(variants)
    if seeds < 1 or timing_rounds < 1 or mc_samples < 0:
        raise ComparisonError(f"need seeds >= 1, timing_rounds >= 1 and mc_samples >= 0, got {seeds}, "
                              f"{timing_rounds} and {mc_samples}")
    if "seed" in finetune_options or "resume" in finetune_options:
        raise ComparisonError("compare sets each run's seed and resume itself; pass seeds= and resume=")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume, parsed)
    if not is_primary():
        log = _quiet
    epochs = finetune_options.get("epochs", FinetuneConfig.epochs)
    bar = _Bar(seeds * len(parsed) * epochs, epochs, show=finetune_options.get("progress", True) and is_primary(),
               verbose=verbose, log=log)
    run_options = {**finetune_options, "progress": False}  # one bar for the comparison, not one per epoch
    with joined_world(finetune_options.get("device")), bar:
        if is_primary():  # after every rank has checked the folder (joining the group is a rendezvous)
            with atomic_path(out_dir / VARIANTS_FILE) as tmp:
                tmp.write_text(json.dumps([v.key for v in parsed]), encoding="utf-8")
        started = time.perf_counter()
        histories: dict[str, list[History]] = {v.spec: [] for v in parsed}
        step_seconds: dict[str, list[list[float]]] = {v.spec: [] for v in parsed}
        evaluations: dict[str, list[Evaluation]] = {v.spec: [] for v in parsed}
        for seed in range(seeds):
            torch.manual_seed(seed)
            base = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
            models = {v.spec: v.build(base) for v in parsed}
            seed_dir = out_dir / f"seed-{seed}"
            bar.stage(f"seed {seed + 1}/{seeds} timing",
                      f"seed {seed + 1}/{seeds}: timing {len(models)} variants, {timing_rounds} interleaved rounds")
            for spec, seconds in _step_seconds(models, train_loader, seed_dir / TIMING_FILE, timing_rounds, resume,
                                               {**run_options, "seed": seed}).items():
                step_seconds[spec].append(seconds)
            for variant in parsed:
                bar.stage(f"seed {seed + 1}/{seeds} {variant.spec}",
                          f"seed {seed + 1}/{seeds}: training {variant.spec}")
                result = finetune(models[variant.spec], train_loader, val_loader, seed_dir / variant.folder,
                                  seed=seed, resume=resume, on_epoch=bar.epoch, **run_options)
                histories[variant.spec].append(result.history)
                evaluations[variant.spec].append(evaluate(models[variant.spec], val_loader, mc_samples, seed))
                bar.run_done(f"seed {seed + 1}/{seeds}: {variant.spec} final test accuracy "
                             f"{result.final['val_acc']:.2f}%, best {result.best_acc:.2f}%")
    settings = {"title": title, "description": description, "seeds": seeds, "timing_rounds": timing_rounds,
                "mc_samples": mc_samples,
                "finetune": {k: v for k, v in finetune_options.items() if k != "progress"},
                "torch": torch.__version__, "timm": timm.__version__, "machine": platform.machine(),
                "wall_s_this_process": round(time.perf_counter() - started, 1)}
    comparison = Comparison(out_dir, [v.spec for v in parsed], histories, step_seconds, target, settings, evaluations,
                            mc_samples)
    if is_primary():
        comparison.write()
    return comparison
