"""How sure a comparison over a few seeds is: t-intervals, paired differences and verdicts.

Pure functions of plain numbers (no torch): a value per seed in, an :class:`Interval` or
a :class:`Difference` with its verdict in words out. Intervals are Student-t intervals
over seeds, which assume the per-seed values (or per-seed paired differences) are roughly
normal and independent across seeds; with 3-5 seeds that is the honest statement of how
little a few runs pin down.

A comparison makes many paired tests at once (every variant against the baseline, on
every metric); :func:`holm` decides their verdicts together with Holm's step-down
procedure, so that the chance of calling any difference that is noise stays at 5 % for
the whole family, while each difference keeps its own 95 % interval.
"""
from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from scipy.stats import t as student_t

__all__ = ["CONFIDENCE", "MAX_SEEDS", "Difference", "Interval", "epochs_to", "holm", "median_ratio",
           "paired_difference", "seeds_needed", "t_interval"]

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


@functools.lru_cache(maxsize=4096)  # a few confidence levels, n up to MAX_SEEDS: comparisons ask the same ones
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
    def enough(n: int) -> bool:  # the half-width falls as n grows: bisect for the first n where it is enough
        return _t_quantile(n, confidence) * sd / math.sqrt(n) < abs(mean)

    if not enough(MAX_SEEDS):
        return None
    low, high = 1, MAX_SEEDS  # not enough(low) (one seed gives no interval), enough(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


@dataclass(frozen=True)
class Difference:
    """A variant minus the baseline, paired by seed, with its interval and verdict."""

    interval: Interval
    verdict: str  # "better", "worse" or "not resolved at N seeds"
    seeds_needed: int | None  # for an unresolved difference: see :func:`seeds_needed`
    p_value: float = math.nan  # two-sided paired t-test; nan with one seed
    sd: float = math.nan  # standard deviation of the per-seed differences
    higher_is_better: bool = True

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
    sd = statistics.stdev(differences) if len(differences) > 1 else math.inf
    unresolved = Difference(interval, _unresolved(interval.n), None, _p_value(interval.mean, sd, interval.n), sd,
                            higher_is_better)
    return _decided(unresolved, interval.excludes_zero(), confidence)


def _unresolved(n: int) -> str:
    return f"not resolved at {n} seed{'s' if n != 1 else ''}"


def _p_value(mean: float, sd: float, n: int) -> float:
    """Two-sided p-value of the paired t-test of ``mean == 0``; nan with fewer than 2 seeds."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * student_t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def _decided(difference: Difference, rejected: bool, confidence: float) -> Difference:
    """``difference`` with the verdict a test at ``confidence`` gives: better or worse when ``rejected``,
    else not resolved with the seeds the observed spread would need at that level."""
    interval = difference.interval
    if rejected:
        gain = interval.mean > 0 if difference.higher_is_better else interval.mean < 0
        return replace(difference, verdict="better" if gain else "worse", seeds_needed=None)
    return replace(difference, verdict=_unresolved(interval.n),
                   seeds_needed=seeds_needed(interval.mean, difference.sd, confidence))


Key = TypeVar("Key", bound=Hashable)


def holm(differences: Mapping[Key, Difference], confidence: float = CONFIDENCE) -> dict[Key, Difference]:
    """The verdicts of a family of paired tests, decided together by Holm's step-down procedure.

    With ``m`` tests and ``alpha = 1 - confidence``: order the p-values; the k-th smallest
    (k = 1..m) is rejected while every one before it was and it is at most ``alpha / (m - k + 1)``.
    The chance that any test of the family calls a difference that is noise is then at most
    ``alpha``, whatever the dependence between the tests. An unresolved difference's
    ``seeds_needed`` is counted at level ``alpha / m``, the level at which a test is rejected
    whatever the others show. Intervals are left as they are (per comparison, at ``confidence``).
    """
    alpha, m = 1 - confidence, len(differences)
    order = sorted(differences, key=lambda k: 1.0 if math.isnan(differences[k].p_value) else differences[k].p_value)
    rejected: set[Key] = set()
    for rank, key in enumerate(order):
        if math.isnan(differences[key].p_value) or differences[key].p_value > alpha / (m - rank):
            break
        rejected.add(key)
    return {key: _decided(d, key in rejected, 1 - alpha / m) for key, d in differences.items()}


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
