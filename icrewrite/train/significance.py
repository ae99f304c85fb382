"""How sure a comparison over a few seeds is: t-intervals, paired differences and verdicts.

Pure functions of plain numbers (no torch): a value per seed in, an :class:`Interval` or
a :class:`Difference` with its verdict in words out. Intervals are Student-t intervals
over seeds, which assume the per-seed values (or per-seed paired differences) are roughly
normal and independent across seeds; with 3-5 seeds that is the honest statement of how
little a few runs pin down.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy.stats import t as student_t

__all__ = ["CONFIDENCE", "MAX_SEEDS", "Difference", "Interval", "epochs_to", "median_ratio", "paired_difference",
           "seeds_needed", "t_interval"]

CONFIDENCE = 0.95
MAX_SEEDS = 1000  # seeds_needed stops counting here: beyond it the difference is too small to chase


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its two-sided t-interval; ``low``/``high`` are ``nan`` for one value
    (one seed says nothing about the spread)."""

    mean: float
    low: float
    high: float
    n: int

    def format(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed: no interval)"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def _t_quantile(n: int, confidence: float) -> float:
    return float(student_t.ppf(0.5 + confidence / 2, n - 1))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``values`` +/- ``t(n-1) * s / sqrt(n)``: the usual interval for a mean over seeds.

    Zero spread gives a zero-width interval (identical values); one value gives no interval.
    """
    if not values:
        raise ValueError("an interval needs at least one value")
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = _t_quantile(n, confidence) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def seeds_needed(mean: float, sd: float, confidence: float = CONFIDENCE) -> int | None:
    """Fewest seeds whose interval would exclude 0 if the mean difference and its spread stayed as observed.

    The smallest ``n >= 2`` with ``t_{(1+confidence)/2, n-1} * sd / sqrt(n) < |mean|``. ``None``
    when no number of seeds would do (a zero mean difference) or more than ``MAX_SEEDS`` would.
    """
    if mean == 0 or not math.isfinite(sd):
        return None
    for n in range(2, MAX_SEEDS + 1):
        if _t_quantile(n, confidence) * sd / math.sqrt(n) < abs(mean):
            return n
    return None


@dataclass(frozen=True)
class Difference:
    """A variant minus the baseline, paired by seed, with its interval and verdict."""

    interval: Interval
    verdict: str  # "better", "worse" or "not resolved at N seeds"
    seeds_needed: int | None  # for an unresolved difference: see :func:`seeds_needed`

    def explain(self, digits: int = 2) -> str:
        """The difference, its interval and the verdict in one phrase."""
        text = f"{self.interval.mean:+.{digits}f}"
        if self.interval.n >= 2:
            text += f" [{self.interval.low:+.{digits}f}, {self.interval.high:+.{digits}f}]"
        text += f": {self.verdict}"
        if self.verdict.startswith("not resolved"):
            text += (" (one seed shows no spread: run more seeds)" if self.interval.n < 2 else
                     " (a zero difference: no number of seeds resolves it)" if self.interval.mean == 0 else
                     f" (the observed spread would need {self.seeds_needed} seeds)" if self.seeds_needed else
                     f" (the observed spread would need more than {MAX_SEEDS} seeds)")
        return text


def paired_difference(variant: Sequence[float], baseline: Sequence[float], *, higher_is_better: bool = True,
                      confidence: float = CONFIDENCE) -> Difference:
    """``variant[i] - baseline[i]`` over seeds ``i``, its t-interval and a verdict.

    "better" or "worse" only when the interval excludes 0 (which needs 2 or more seeds);
    otherwise "not resolved at N seeds", with the seeds the observed spread would need.
    """
    if len(variant) != len(baseline):
        raise ValueError(f"paired values need one per seed on both sides, got {len(variant)} and {len(baseline)}")
    differences = [v - b for v, b in zip(variant, baseline)]
    interval = t_interval(differences, confidence)
    if interval.excludes_zero():
        gain = interval.mean > 0 if higher_is_better else interval.mean < 0
        return Difference(interval, "better" if gain else "worse", None)
    sd = statistics.stdev(differences) if len(differences) > 1 else math.inf
    return Difference(interval, f"not resolved at {interval.n} seed{'s' if interval.n != 1 else ''}",
                      seeds_needed(interval.mean, sd, confidence))


def epochs_to(history: Sequence[Mapping[str, float]], target: float, key: str = "val_acc") -> int | None:
    """The first epoch whose ``key`` reaches ``target``; ``None`` for a run that never does."""
    return next((int(r["epoch"]) for r in history if r[key] >= target), None)


def median_ratio(seconds: Sequence[float], baseline_seconds: Sequence[float]) -> float:
    """Median over rounds of ``seconds[i] / baseline_seconds[i]``: per-step times measured in the
    same round (interleaved) share the machine's load, so their ratio cancels it; the median
    ignores the rounds a burst of other work hit one side of."""
    if len(seconds) != len(baseline_seconds) or not seconds:
        raise ValueError("step-time ratios need the same, non-zero number of rounds on both sides")
    return statistics.median(s / b for s, b in zip(seconds, baseline_seconds))
