"""Does IC help this model on this data? A seeded, paired comparison of variants, with intervals.

``compare(model, train, test, out_dir, variants=["baseline", "ic", "ic:p=0.1"], seeds=3, epochs=...)``
trains every variant once per seed and reports, per variant, the mean and 95% t-interval over
seeds of its figures and, against the baseline, the paired difference with a verdict in
words (:mod:`.significance` does the statistics).

The runs are paired: per seed the model is built once and every variant starts from it
(``convert`` copies it), and every variant's run uses that seed, which fixes the data order
and each sample's augmentation (:func:`.data.resumable_loader`). Each run is a
:func:`~icrewrite.finetune` run in ``out_dir/seed-S/VARIANT/``, so ``resume=True`` continues a
comparison after a crash: finished runs are read back, an unfinished one resumes from its
state. Time per step is not taken from the runs (trained at different times, they carry
whatever else the machine did meanwhile) but from a short timing phase per seed that steps the
variants round-robin on the same batches (:func:`.loop.time_steps`).

Writes ``out_dir/report.md``, ``compare.json`` (settings, every run's per-epoch records, the
timing rounds and the summary) and ``compare.png`` (test accuracy and loss, mean +/- sd over
seeds), atomically, from rank 0 only under torchrun.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ICRewriteError
from ..files import atomic_path
from ..rewrite import Options, convert
from .loop import finetune, is_primary, joined_world, time_steps
from ..plot import plot_mean_std
from .significance import CONFIDENCE, Difference, Interval, epochs_to, median_ratio, paired_difference, t_interval

__all__ = ["BASELINE", "Comparison", "ComparisonError", "Variant", "check_out_dir", "compare", "parse_variants"]

BASELINE = "baseline"
IC_VARIANT = "ic"
TIMING_FILE = "timing.json"
Log = Callable[[str], None]
History = list[dict[str, float]]


class ComparisonError(ICRewriteError):
    """A comparison cannot be set up as asked (a bad variant, a folder in use)."""


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: the baseline model, or its IC conversion with ``options``."""

    spec: str
    options: Mapping[str, Any] | None = None  # convert's keyword arguments; None for the baseline

    @property
    def folder(self) -> str:
        """A file-name-safe form of ``spec``: ``ic:p=0.1,layout=ic-conv-relu`` -> ``ic-p0.1-layout-ic-conv-relu``."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.spec.replace("=", "")).strip("-")

    def build(self, model: nn.Module) -> nn.Module:
        """This variant of ``model``, which is left as it is."""
        return copy.deepcopy(model) if self.options is None else convert(model, **self.options)


# IC variants start from default BatchNorm statistics: a comparison trains its models, and the other
# layouts need it. ``ic:init=preserve`` keeps a trained model's function instead.
IC_DEFAULTS = {"init": "fresh"}


def _option_value(option: dataclasses.Field, text: str, spec: str) -> Any:
    kind = type(option.default)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ComparisonError(f"variant {spec!r}: {option.name} takes true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind is tuple:
        return tuple(text.split("|"))
    try:
        return kind(text)
    except ValueError:
        raise ComparisonError(f"variant {spec!r}: {option.name} takes a {kind.__name__}, got {text!r}") from None


def parse_variant(spec: str) -> Variant:
    """``baseline``, ``ic`` or ``ic:KEY=VALUE,...`` with keys from :class:`~icrewrite.Options`
    (``p``, ``init``, ``layout``, ``stem``, ``head``, ``exclude`` with ``|`` between patterns)."""
    spec = spec.strip()
    if spec == BASELINE:
        return Variant(spec)
    kind, _, settings = spec.partition(":")
    if kind != IC_VARIANT or (not settings and ":" in spec):
        raise ComparisonError(f"bad variant {spec!r}: use baseline, ic or ic:KEY=VALUE,... (e.g. ic:p=0.1)")
    fields = {f.name: f for f in dataclasses.fields(Options)}
    options: dict[str, Any] = dict(IC_DEFAULTS)
    for item in filter(None, settings.split(",")):
        key, equals, text = item.partition("=")
        if not equals or key not in fields:
            raise ComparisonError(f"bad variant {spec!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(fields)}")
        options[key] = _option_value(fields[key], text, spec)
    try:
        Options(**options)
    except ICRewriteError as err:
        raise ComparisonError(f"variant {spec!r}: {err}") from None
    return Variant(spec, options)


def parse_variants(specs: str | Sequence[str]) -> list[Variant]:
    """Variants from a list of specs or from one string such as ``"baseline,ic,ic:p=0.1,layout=ic-conv-relu"``
    (the CLI's ``--variants``): a ``KEY=VALUE`` item after an ``ic:...`` one continues it. The
    baseline must be among them; it goes first."""
    if isinstance(specs, str):
        items: list[str] = []
        for item in specs.split(","):
            continues = "=" in item and ":" not in item and items and items[-1].startswith(f"{IC_VARIANT}:")
            items[-1:] = [f"{items[-1]},{item}"] if continues else [*items[-1:], item]
        specs = items
    variants = [parse_variant(spec) for spec in specs]
    names = [v.spec for v in variants]
    if BASELINE not in names:
        raise ComparisonError("the variants must include baseline: every other variant is compared with it")
    folders = [v.folder for v in variants]
    duplicates = sorted({n for n, f in zip(names, folders) if folders.count(f) > 1})
    if duplicates:
        raise ComparisonError(f"variants given twice: {', '.join(duplicates)}")
    return sorted(variants, key=lambda v: v.spec != BASELINE)


@dataclass(frozen=True)
class Summary:
    """A variant's figures over seeds; ``against_baseline`` is empty for the baseline."""

    final_acc: Interval
    best_acc: Interval
    final_loss: Interval
    epochs_to_target: Interval | None  # over the runs that reached the target; None if none did
    reached: int
    step_ratio: Interval
    against_baseline: dict[str, Difference] = field(default_factory=dict)


@dataclass
class Comparison:
    """Every run's per-epoch records and timing rounds, by variant and seed, and what they show."""

    out_dir: Path
    variants: list[str]
    histories: dict[str, list[History]]  # variant -> one history per seed
    step_seconds: dict[str, list[list[float]]]  # variant -> per seed, seconds per step of each timing round
    target: float
    settings: dict[str, Any]

    @property
    def seeds(self) -> int:
        return len(self.histories[BASELINE])

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out_dir / f"seed-{seed}" / parse_variant(variant).folder

    def summaries(self) -> dict[str, Summary]:
        return {variant: self._summary(variant) for variant in self.variants}

    def _per_seed(self, variant: str) -> dict[str, list[float]]:
        histories = self.histories[variant]
        return {"final test accuracy (points)": [h[-1]["val_acc"] for h in histories],
                "best test accuracy (points)": [max(r["val_acc"] for r in h) for h in histories],
                "final test loss": [h[-1]["val_loss"] for h in histories]}

    def _summary(self, variant: str) -> Summary:
        reached = [e for e in (epochs_to(h, self.target) for h in self.histories[variant]) if e is not None]
        ratios = [median_ratio(s, b) for s, b in zip(self.step_seconds[variant], self.step_seconds[BASELINE])]
        final_acc, best_acc, final_loss = (t_interval(v) for v in self._per_seed(variant).values())
        against = {} if variant == BASELINE else {
            metric: paired_difference(values, base, higher_is_better="loss" not in metric)
            for (metric, values), base in zip(self._per_seed(variant).items(), self._per_seed(BASELINE).values())}
        return Summary(final_acc, best_acc, final_loss, t_interval(reached) if reached else None, len(reached),
                       t_interval(ratios), against)

    def verdicts(self) -> dict[str, str]:
        """Per IC variant, its final test accuracy against the baseline's in one sentence."""
        return {variant: f"{variant} against {BASELINE}, final test accuracy (points): "
                         f"{s.against_baseline['final test accuracy (points)'].explain()}"
                for variant, s in self.summaries().items() if variant != BASELINE}

    def table(self) -> str:
        """Per variant, its figures over seeds: a Markdown table."""
        n = self.seeds
        lines = [f"| variant | final test acc (%) | best test acc (%) | final test loss | epochs to {self.target:g}% "
                 "| step time / baseline |", "|---|---|---|---|---|---|"]
        for variant, s in self.summaries().items():
            epochs = (f"{s.epochs_to_target.format(1)} ({s.reached}/{n} runs)" if s.epochs_to_target
                      else f"never (0/{n} runs)")
            ratio = "1 (reference)" if variant == BASELINE else s.step_ratio.format()
            lines.append(f"| {variant} | {s.final_acc.format()} | {s.best_acc.format()} | "
                         f"{s.final_loss.format(4)} | {epochs} | {ratio} |")
        return "\n".join(lines)

    def report(self) -> str:
        """The Markdown of ``report.md``."""
        summaries, n = self.summaries(), self.seeds
        lines = [f"# {self.settings['title']}", "", self.settings["description"], "",
                 f"{n} seed(s) per variant, paired: per seed every variant starts from the same initial weights "
                 f"and sees the same data order and augmentation. Figures are means over seeds with their "
                 f"{CONFIDENCE:.0%} t-interval [low, high]. Step time / baseline: per seed, the median over "
                 f"{self.settings['timing_rounds']} interleaved rounds (every variant one step on the same batch "
                 "per round) of the variant's step time over the baseline's in the same round; then its mean "
                 "and interval over seeds.", "",
                 self.table()]
        metrics = list(self._per_seed(BASELINE))
        lines += ["", f"Against the baseline: the paired difference (variant minus baseline, per seed), its "
                      f"{CONFIDENCE:.0%} t-interval and the verdict (better or worse only when the interval "
                      "excludes 0).", "",
                  "| variant | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for variant, s in summaries.items():
            if variant != BASELINE:
                lines.append(f"| {variant} | " + " | ".join(
                    s.against_baseline[m].explain(4 if "loss" in m else 2) for m in metrics) + " |")
        lines += ["", "Verdicts:", "", *(f"- {v}" for v in self.verdicts().values()), "",
                  "![test accuracy and loss](compare.png)", "",
                  "Every run's per-epoch records are in `compare.json`; each run's files are in "
                  "`seed-S/VARIANT/` (a `finetune` run)."]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "variants": self.variants, "target": self.target,
                "runs": self.histories, "step_seconds": self.step_seconds,
                "summary": {v: _plain(dataclasses.asdict(s)) for v, s in self.summaries().items()}}

    def write(self) -> None:
        """``report.md``, ``compare.json`` and ``compare.png`` in ``out_dir``, each written atomically."""
        curves = {metric: {v: np.array([[r[key] for r in h] for h in hs]) for v, hs in self.histories.items()}
                  for metric, key in (("test accuracy (%), mean ± sd over seeds", "val_acc"),
                                      ("test loss, mean ± sd over seeds", "val_loss"))}
        plot_mean_std(curves, self.out_dir / "compare.png")
        with atomic_path(self.out_dir / "compare.json") as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1))
        with atomic_path(self.out_dir / "report.md") as tmp:
            tmp.write_text(self.report())


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


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """Refuse a folder in use unless the comparison in it is resumed."""
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise ComparisonError(f"{out_dir} is not empty; resume the comparison in it or choose another output folder")


def _step_seconds(models: dict[str, nn.Module], train_loader: DataLoader, path: Path, rounds: int, resume: bool,
                  options: dict[str, Any]) -> dict[str, list[float]]:
    """The timing rounds of one seed: read back from ``path`` on resume, else measured (and saved)."""
    if resume and path.exists():
        saved = json.loads(path.read_text())
        if set(saved) == set(models):
            return saved
    seconds = time_steps(models, train_loader, rounds=rounds, **options)
    if is_primary():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(seconds))
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
    resume: bool = False,
    title: str = "Paired comparison over seeds",
    description: str = "",
    log: Log = print,
    **finetune_options: Any,
) -> Comparison:
    """Train every variant of ``model`` once per seed ``0 .. seeds-1`` and write the comparison.

    ``model`` is a module (every seed starts from its weights) or a function that builds one
    (called once per seed after ``torch.manual_seed(seed)``: new initial weights per seed).
    ``variants``: see :func:`parse_variants`. ``target``: the test accuracy (%) for "epochs to
    target". ``finetune_options`` go to every run (``epochs``, ``lr``, ...; the seed is the
    comparison's). ``out_dir`` must be empty or absent unless ``resume``. ``title`` and
    ``description`` (what was trained on what) head ``report.md``.
    """
    parsed = parse_variants(variants)
    if seeds < 1 or timing_rounds < 1:
        raise ComparisonError(f"need seeds >= 1 and timing_rounds >= 1, got {seeds} and {timing_rounds}")
    if "seed" in finetune_options or "resume" in finetune_options:
        raise ComparisonError("compare sets each run's seed and resume itself; pass seeds= and resume=")
    out_dir = Path(out_dir)
    check_out_dir(out_dir, resume)
    if not is_primary():
        log = _quiet
    with joined_world(finetune_options.get("device")):
        started = time.perf_counter()
        histories: dict[str, list[History]] = {v.spec: [] for v in parsed}
        step_seconds: dict[str, list[list[float]]] = {v.spec: [] for v in parsed}
        for seed in range(seeds):
            torch.manual_seed(seed)
            base = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
            models = {v.spec: v.build(base) for v in parsed}
            seed_dir = out_dir / f"seed-{seed}"
            log(f"seed {seed + 1}/{seeds}: timing {len(models)} variants, {timing_rounds} interleaved rounds")
            for spec, seconds in _step_seconds(models, train_loader, seed_dir / TIMING_FILE, timing_rounds, resume,
                                               {**finetune_options, "seed": seed}).items():
                step_seconds[spec].append(seconds)
            for variant in parsed:
                log(f"seed {seed + 1}/{seeds}: training {variant.spec}")
                result = finetune(models[variant.spec], train_loader, val_loader, seed_dir / variant.folder,
                                  seed=seed, resume=resume, **finetune_options)
                histories[variant.spec].append(result.history)
                log(f"seed {seed + 1}/{seeds}: {variant.spec} final test accuracy {result.final['val_acc']:.2f}%, "
                    f"best {result.best_acc:.2f}%")
    settings = {"title": title, "description": description, "seeds": seeds, "timing_rounds": timing_rounds,
                "finetune": {k: v for k, v in finetune_options.items() if k != "progress"},
                "torch": torch.__version__, "timm": timm.__version__, "machine": platform.machine(),
                "wall_s_this_process": round(time.perf_counter() - started, 1)}
    comparison = Comparison(out_dir, [v.spec for v in parsed], histories, step_seconds, target, settings)
    if is_primary():
        comparison.write()
    return comparison
