"""Measure how dependent the inputs of weight layers are, before and after an IC block.

Chen et al. (arXiv 1905.05928) show that Dropout with keep probability ``q = 1 - p``
scales the correlation of two zero-mean neurons by ``q`` and their mutual information by
``q**2``. :func:`stats` checks this on a real model and real batches: at every IC site it
measures feature pairs of the IC input and of the IC output, and optionally the input of
the same weight layer in the original model, so a user sees before and after.

Estimators (``docs/independence.md`` has their measured error):

* correlation: mean ``|Pearson r|`` over feature pairs, pooled over batches from
  within-batch centred sums, so that a per-batch, per-feature affine map (train-mode
  BatchNorm) leaves it unchanged and the IC output differs from the IC input only by the
  Dropout masks;
* mutual information: plug-in estimate on a joint histogram with Miller-Madow bias
  correction, in nats. Each batch is binned on its own (quantile bins), and values that
  carry probability mass of their own get bins of their own: exact zeros (Dropout's and
  ReLU's) and every heavily repeated value (ReLU's zero after BatchNorm, a constant
  image background). A Gaussian-assumption estimator would be wrong here (a Dropout
  output is a mixture with an atom at 0), and so would a histogram that lets an atom
  share a bin with nearby values; with atoms in bins of their own, the ``q**2`` law
  holds exactly for the binned variables too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import statistics
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from .compat import forked_rng
from .errors import ICRewriteError
from .files import atomic_path
from .layers import IC, ICWeightLayer, feature_columns
from .registry import is_weight_layer, weight_layer_features
from .rewrite import modes_kept
from .plot import figure

__all__ = [
    "stats",
    "StatsReport",
    "SiteStats",
    "PairStatistics",
    "has_ic_blocks",
    "sample_features",
    "bin_codes",
    "site_bins",
]

MAX_BATCHES = 4
MAX_PAIRS = 120  # all pairs among 16 features
MAX_SAMPLES = 2048  # positions per batch and site
MAX_BINS = 16
SAMPLES_PER_BIN = 64  # per batch; fewer make per-batch quantile bins too noisy (docs/independence.md)
CORR_RESOLUTION = 5.0  # a ratio is compared with theory when both measures are this many noise sd
MI_RESOLUTION = 10.0


def sample_features(num_features: int, max_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` feature indices drawn at random (sorted), ``k`` the largest number whose
    ``k (k - 1) / 2`` pairs fit in ``max_pairs`` (16 features for 120 pairs).

    Measuring all pairs among them gives every pair the same chance to be measured, so
    their mean estimates the mean over all pairs, and only ``k`` features are binned.
    """
    k = min(num_features, int((1 + math.sqrt(1 + 8 * max_pairs)) / 2))
    return torch.randperm(num_features, generator=generator)[:k].sort().values


def site_bins(samples_per_batch: int, max_bins: int = MAX_BINS) -> int:
    """Quantile bins for a site: one per ``SAMPLES_PER_BIN`` samples of a batch, 2 to ``max_bins``."""
    return max(2, min(max_bins, samples_per_batch // SAMPLES_PER_BIN))


def bin_codes(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Histogram bin of every sample, per feature: ``values`` ``(F, S)`` -> codes in
    ``[0, 3 * bins + 1)``.

    Exact zeros get code ``bins``. Every other value that repeats with at least half a
    bin's mass is an atom (ReLU's zero after BatchNorm, a constant image background) and
    gets a code of its own from ``bins + 1`` on. The remaining, continuous values fall
    in ``bins`` equal-frequency bins by rank. Codes depend only on the order of the
    values, so any increasing per-feature map of the batch leaves them unchanged, and an
    atom never shares a bin with nearby values.
    """
    zero = values == 0
    ordered, order = values.masked_fill(zero, math.nan).sort(dim=1)  # zeros (as NaN) last
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # NaN != NaN: zeros never form a run
    run = starts.cumsum(1) - 1
    run_length = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run)).gather(1, run)
    atom = run_length >= max(2, math.ceil(values.shape[1] / (2 * bins)))
    continuous = ~atom & ~ordered.isnan()
    rank = continuous.cumsum(1) - 1
    quantile_bin = rank * bins // continuous.sum(1, keepdim=True).clamp(min=1)
    atom_code = bins + (starts & atom).cumsum(1)
    ordered_codes = torch.where(atom, atom_code, torch.where(continuous, quantile_bin, bins))
    return torch.empty_like(ordered_codes).scatter_(1, order, ordered_codes)


def _entropy(counts: torch.Tensor) -> torch.Tensor:
    """Miller-Madow corrected entropy (nats) of each row of histogram ``counts``."""
    total = counts.sum(1)
    probs = counts / total[:, None]
    plug_in = -torch.special.xlogy(probs, probs).sum(1)
    return plug_in + ((counts > 0).sum(1) - 1) / (2 * total)


class PairStatistics:
    """Pearson correlation and mutual information of every pair of ``num_features``
    features, fed batch by batch.

    ``update`` takes one batch as ``(num_features, samples)``. Correlation is pooled from
    within-batch centred sums; mutual information comes from the joint histograms of
    :func:`bin_codes` with ``bins`` quantile bins, accumulated over batches.
    ``pairs`` ``(P, 2)`` lists the pairs in the order of the results.
    """

    def __init__(self, num_features: int, bins: int = MAX_BINS) -> None:
        self.pairs = torch.triu_indices(num_features, num_features, 1).T
        self.bins = bins
        self.samples = 0
        self._side = 3 * bins + 1  # codes per feature: see bin_codes
        self._offsets = torch.arange(len(self.pairs), dtype=torch.int32)[:, None] * self._side**2
        self._moments = torch.zeros(3, len(self.pairs), dtype=torch.float64)
        self._joint = torch.zeros(len(self.pairs), self._side**2, dtype=torch.int64)

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of samples, ``values`` of shape ``(num_features, samples)``."""
        values = values.detach().to("cpu", torch.float32)
        first, second = self.pairs.T
        centred = values - values.mean(1, keepdim=True)
        products = (centred @ centred.T).double()
        self._moments += torch.stack([products[first, second], products[first, first], products[second, second]])
        codes = bin_codes(values, self.bins).int()
        joint = (codes * self._side)[first].add_(codes[second]).add_(self._offsets)
        self._joint += torch.bincount(joint.flatten(), minlength=self._joint.numel()).view_as(self._joint)
        self.samples += values.shape[1]

    def correlation(self) -> torch.Tensor:
        """Pearson r per pair; NaN where a feature is constant within every batch."""
        cross, first, second = self._moments
        return cross / (first * second).sqrt()

    def mutual_information(self) -> torch.Tensor:
        """Mutual information per pair in nats (Miller-Madow corrected, may dip slightly below 0)."""
        joint = self._joint.double()
        grid = joint.view(len(joint), self._side, self._side)
        return _entropy(grid.sum(2)) + _entropy(grid.sum(1)) - _entropy(joint)

    def mutual_information_noise(self) -> torch.Tensor:
        """Standard deviation of the estimate per pair if the two features were independent:
        ``sqrt(2 df) / (2 N)``, since ``2 N`` times the plug-in estimate is then about
        chi-square with ``df = (kx - 1)(ky - 1)`` degrees of freedom (``k`` occupied bins)."""
        grid = self._joint.view(len(self._joint), self._side, self._side)
        df = ((grid.sum(2) > 0).sum(1) - 1) * ((grid.sum(1) > 0).sum(1) - 1)
        return (2.0 * df).sqrt() / (2 * self.samples)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


@dataclasses.dataclass(frozen=True)
class SiteStats:
    """Dependence between feature pairs at one weight layer's input.

    ``corr_*`` is the mean ``|Pearson r|`` and ``mi_*`` the mean mutual information
    (nats) over the pairs in which no feature is constant: ``*_in`` at the layer's input
    (the IC block's input, if there is one), ``*_out`` at the IC block's output (``None``
    without IC). ``expected_corr_ratio`` is what theory predicts for ``corr_out /
    corr_in``: ``q`` for a zero-mean IC output, less when the IC's BatchNorm shift
    ``beta`` is not 0 (see ``docs/independence.md``). ``*_noise`` is the standard
    deviation of one pair's estimate for independent features at this sample size.
    """

    name: str
    features: int
    pairs: int
    samples: int
    bins: int
    corr_in: float
    mi_in: float
    corr_noise: float
    mi_noise: float
    p: float | None = None
    corr_out: float | None = None
    mi_out: float | None = None
    expected_corr_ratio: float | None = None

    @property
    def q(self) -> float | None:
        """Keep probability of the IC block's Dropout."""
        return None if self.p is None else 1.0 - self.p

    @property
    def corr_ratio(self) -> float | None:
        return None if self.corr_out is None else _ratio(self.corr_out, self.corr_in)

    @property
    def mi_ratio(self) -> float | None:
        return None if self.mi_out is None else _ratio(self.mi_out, self.mi_in)

    @property
    def expected_mi_ratio(self) -> float | None:
        """``q**2``: exact for the mutual information of independent masks, whatever the means."""
        return None if self.q is None else self.q**2

    @property
    def corr_resolved(self) -> bool:
        """Whether ``|r|`` stands at least 5 noise sd above 0 at the input and the output,
        enough for a ratio within a few percent."""
        return min(self.corr_in, _or(self.corr_out, self.corr_in)) >= CORR_RESOLUTION * self.corr_noise

    @property
    def mi_resolved(self) -> bool:
        """Whether the mutual information stands at least 10 noise sd above 0 at the input and
        the output, enough for a ratio within about 10% (``docs/independence.md``)."""
        return min(self.mi_in, _or(self.mi_out, self.mi_in)) >= MI_RESOLUTION * self.mi_noise

    def to_dict(self) -> dict[str, Any]:
        derived = ("corr_ratio", "mi_ratio", "expected_mi_ratio", "corr_resolved", "mi_resolved")
        return {**dataclasses.asdict(self), **{key: getattr(self, key) for key in derived}}


def _correlation_shrink(ic: nn.Module) -> torch.Tensor:
    """Per feature ``1 / sqrt(1 + p beta^2 / gamma^2)``: with ``z = BN(x)`` of batch mean
    ``beta`` and variance ``gamma^2``, ``corr(drop(z_i), drop(z_j)) = q corr(z_i, z_j)``
    times this factor of ``i`` and of ``j``."""
    norm = ic.norm
    shift = torch.zeros(ic.num_features) if norm.bias is None else norm.bias.detach().float().cpu()
    scale = torch.ones(ic.num_features) if norm.weight is None else norm.weight.detach().float().cpu()
    return (1 + ic.p * (shift / scale) ** 2).rsqrt()


class _MeasuredSite:
    """Accumulators for one measured position and the hook that feeds them.

    ``module`` is an IC block (its input and output are measured) or a weight layer of an
    unconverted model (its input is measured).
    """

    def __init__(
        self, name: str, module: nn.Module, *, max_pairs: int, max_bins: int, max_samples: int, seed: int
    ) -> None:
        self.name, self.module = name, module
        self.ic = module if isinstance(module, IC) else None
        if self.ic is not None:
            self.num_features, self.feature_dim = self.ic.num_features, self.ic.feature_dim
        else:
            self.num_features, self.feature_dim = weight_layer_features(module)
        generator = torch.Generator().manual_seed(seed)
        self.features = sample_features(self.num_features, max_pairs, generator)
        self.generator = generator
        self.max_bins, self.max_samples = max_bins, max_samples
        self.inputs: PairStatistics | None = None
        self.outputs: PairStatistics | None = None

    def attach(self) -> RemovableHandle:
        if self.ic is None:
            return self.module.register_forward_pre_hook(lambda _module, args: self.record(args[0], None))
        return self.module.register_forward_hook(lambda _module, args, output: self.record(args[0], output))

    def _matrix(self, x: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        matrix = feature_columns(x.index_select(self.feature_dim, self.features.to(x.device)), self.feature_dim).T
        return matrix if columns is None else matrix[:, columns]

    def record(self, x_in: torch.Tensor, x_out: torch.Tensor | None) -> None:
        """Add the chosen features at up to ``max_samples`` random positions (the same for input and output)."""
        samples = x_in.numel() // x_in.shape[self.feature_dim]
        columns = None
        if samples > self.max_samples:
            columns = torch.randperm(samples, generator=self.generator)[: self.max_samples].to(x_in.device)
        if self.inputs is None:
            bins = site_bins(min(samples, self.max_samples), self.max_bins)
            self.inputs = PairStatistics(len(self.features), bins)
            self.outputs = None if self.ic is None else PairStatistics(len(self.features), bins)
        self.inputs.update(self._matrix(x_in, columns))
        if self.outputs is not None:
            self.outputs.update(self._matrix(x_out, columns))

    def result(self) -> SiteStats:
        """Means over the pairs defined on both sides (no feature constant within every batch)."""
        assert self.inputs is not None, "a site records at least one batch"
        sides = [self.inputs] if self.outputs is None else [self.inputs, self.outputs]
        valid = torch.stack([side.correlation().isfinite() for side in sides]).all(0)

        def mean(values: torch.Tensor) -> float:
            return values[valid].mean().item()

        abs_in = self.inputs.correlation().abs()[valid]
        mi_noise = torch.stack([side.mutual_information_noise() for side in sides]).amax(0)[valid]
        measured = SiteStats(
            name=self.name,
            features=self.num_features,
            pairs=int(valid.sum()),
            samples=self.inputs.samples,
            bins=self.inputs.bins,
            corr_in=abs_in.mean().item(),
            mi_in=mean(self.inputs.mutual_information()),
            corr_noise=self.inputs.samples**-0.5,
            mi_noise=mi_noise.median().item() if len(mi_noise) else math.nan,
        )
        if self.outputs is None:
            return measured
        shrink = _correlation_shrink(self.ic)[self.features][self.inputs.pairs].prod(1)[valid].double()
        return dataclasses.replace(
            measured,
            p=self.ic.p,
            corr_out=mean(self.outputs.correlation().abs()),
            mi_out=mean(self.outputs.mutual_information()),
            expected_corr_ratio=(1 - self.ic.p) * ((shrink * abs_in).sum() / abs_in.sum()).item(),
        )


def has_ic_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has converted weight layers, measured at their IC blocks by :func:`stats`."""
    return any(isinstance(m, ICWeightLayer) for m in model.modules())


def _make_sites(model: nn.Module, names: Iterable[str] | None, **options: Any) -> list[_MeasuredSite]:
    """The IC blocks of a converted model, or else its weight layers (only ``names`` if given).

    Features are drawn from ``(number of features, seed)`` alone, so the same position
    in an original and a converted model is measured on the same pairs.
    """
    converted = has_ic_blocks(model)
    wanted = None if names is None else set(names)
    sites = []
    for name, module in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if converted and isinstance(module, ICWeightLayer):
            sites.append(_MeasuredSite(name, module.ic, **options))
        elif not converted and is_weight_layer(module):
            sites.append(_MeasuredSite(name, module, **options))
    return sites


@contextlib.contextmanager
def _train_mode_without_updates(model: nn.Module) -> Iterator[None]:
    """Train mode without side effects: buffers (BatchNorm running statistics) and each
    module's training flag are restored afterwards, gradients are off."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    with modes_kept(model):
        model.train()
        try:
            with torch.no_grad():
                yield
        finally:
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _batch_input(batch: Any) -> torch.Tensor:
    """The model input of a loader batch: the batch itself or the first item of ``(input, target)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _measure(
    model: nn.Module,
    batches: Sequence[torch.Tensor],
    names: Iterable[str] | None,
    *,
    seed: int,
    progress: bool,
    **options: Any,
) -> list[SiteStats]:
    """Run ``batches`` through ``model`` in train mode with hooks at every site."""
    sites = _make_sites(model, names, seed=seed, **options)
    if not sites:
        where = "no weight layer" if names is None else "no weight layer at the IC sites of the converted model"
        raise ICRewriteError(f"{type(model).__name__} has {where} to measure")
    handles = [site.attach() for site in sites]
    parameter = next(model.parameters())
    try:
        with _train_mode_without_updates(model), forked_rng(parameter.device, seed):
            bar = tqdm(batches, desc=f"stats {type(model).__name__}", unit="batch", disable=not progress, leave=False)
            for batch in bar:
                model(batch.to(parameter.device, parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
    return [site.result() for site in sites if site.inputs is not None]  # a layer the forward never called has none


def stats(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    original: nn.Module | None = None,
    max_batches: int = MAX_BATCHES,
    max_pairs: int = MAX_PAIRS,
    max_samples: int = MAX_SAMPLES,
    max_bins: int = MAX_BINS,
    seed: int = 0,
    progress: bool = False,
) -> StatsReport:
    """Measure feature dependence at every IC site of ``model``, in train mode.

    At each converted weight layer, the input and the output of its IC block are measured
    on up to ``max_pairs`` feature pairs and ``max_samples`` positions per batch, over the
    first ``max_batches`` batches of ``loader`` (tensors or ``(input, target)`` pairs). A
    model without IC blocks is measured at the input of every weight layer. ``original``,
    the unconverted model, is measured on the same batches at the same positions. The
    models do not change: gradients are off and buffers are restored. ``seed`` fixes the
    features, the positions and the Dropout masks.
    """
    batches = [_batch_input(batch) for batch in itertools.islice(loader, max_batches)]
    if not batches:
        raise ICRewriteError("the data loader yielded no batches")
    options = dict(max_pairs=max_pairs, max_bins=max_bins, max_samples=max_samples, seed=seed, progress=progress)
    sites = _measure(model, batches, None, **options)
    before = None if original is None else _measure(original, batches, [s.name for s in sites], **options)
    return StatsReport(sites=sites, original=before, batches=len(batches))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None, resolved: bool) -> str:
    """A ratio, in parentheses when its measures are not resolved above the noise."""
    return _fmt(value) if resolved or value is None else f"({value:.3f})"


ESTIMATOR = (
    "|r|: mean |Pearson r| over feature pairs, within-batch centred. MI: nats, joint histogram of "
    "per-batch quantile bins + a bin for zeros + a bin per atom, Miller-Madow corrected."
)


@dataclasses.dataclass(frozen=True)
class StatsReport:
    """Per-site dependence measures: ``print(report)`` is a table, ``to_dict()`` JSON-ready,
    ``write_png(path)`` a bar chart. ``original`` holds the unconverted model's sites."""

    sites: Sequence[SiteStats]
    original: Sequence[SiteStats] | None
    batches: int

    @property
    def converted(self) -> bool:
        return any(s.p is not None for s in self.sites)

    def original_at(self, name: str) -> SiteStats | None:
        """The original model's measurement at position ``name``, if any."""
        return next((s for s in self.original or () if s.name == name), None)

    def summary(self) -> dict[str, float]:
        """Medians of the measured and the expected output/input ratios over the IC sites
        whose measures are resolved above the noise (``SiteStats.*_resolved``), and the
        number of those sites."""
        ic = [s for s in self.sites if s.p is not None and s.pairs]
        if not ic:
            return {}
        result: dict[str, float] = {}
        for key in ("corr", "mi"):
            resolved = [s for s in ic if getattr(s, f"{key}_resolved")]
            result[f"{key}_sites"] = len(resolved)
            for ratio in (f"{key}_ratio", f"expected_{key}_ratio"):
                result[ratio] = statistics.median(getattr(s, ratio) for s in resolved) if resolved else math.nan
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "estimator": ESTIMATOR,
            "sites": [s.to_dict() for s in self.sites],
            "original": None if self.original is None else [s.to_dict() for s in self.original],
            "summary": self.summary(),
        }

    def _columns(self) -> list[tuple[str, Any]]:
        """``(header, cell(site, original_site))`` for each table column present."""
        columns: list[tuple[str, Any]] = [
            ("layer", lambda s, o: s.name),
            ("C", lambda s, o: str(s.features)),
            ("pairs", lambda s, o: str(s.pairs)),
            ("samples", lambda s, o: str(s.samples)),
            ("bins", lambda s, o: str(s.bins)),
        ]
        for key, digits, expected in (("corr", 3, "expected_corr_ratio"), ("mi", 4, "expected_mi_ratio")):
            label = "|r|" if key == "corr" else "MI"
            if self.original is not None:
                columns.append((f"{label} orig", lambda s, o, k=f"{key}_in", d=digits: _fmt(o and getattr(o, k), d)))
            columns.append((f"{label} in", lambda s, o, k=f"{key}_in", d=digits: _fmt(getattr(s, k), d)))
            if self.converted:
                columns += [
                    (f"{label} out", lambda s, o, k=f"{key}_out", d=digits: _fmt(getattr(s, k), d)),
                    ("out/in", lambda s, o, k=key: _fmt_ratio(getattr(s, f"{k}_ratio"), getattr(s, f"{k}_resolved"))),
                    ("theory", lambda s, o, k=expected: _fmt(getattr(s, k))),
                ]
        return columns

    def __str__(self) -> str:
        columns = self._columns()
        rows = [[header for header, _ in columns]]
        rows += [[cell(s, self.original_at(s.name)) for _, cell in columns] for s in self.sites]
        widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
        ]
        if self.converted:
            title = "Feature dependence at IC sites: in = IC block input, out = IC block output"
        else:
            title = "Feature dependence at weight-layer inputs (no IC blocks)"
        if self.original is not None:
            title += "; orig = the same layer's input in the original model"
        footer = [f"{len(self.sites)} sites, {self.batches} batches, train mode. {ESTIMATOR}"]
        summary = self.summary()
        if summary:
            footer += [
                f"(ratio): |r| below {CORR_RESOLUTION:g} or MI below {MI_RESOLUTION:g} times the noise of one pair's "
                "estimate at this sample size, at input or output: too noisy to compare with theory.",
                f"median over resolved IC sites: |r| out/in {summary['corr_ratio']:.3f} (theory "
                f"{summary['expected_corr_ratio']:.3f}, {summary['corr_sites']} sites), MI out/in "
                f"{summary['mi_ratio']:.3f} (theory q^2 = {summary['expected_mi_ratio']:.3f}, "
                f"{summary['mi_sites']} sites)",
            ]
        return "\n".join([title, *lines, *footer])

    def write_png(self, path: str | PathLike) -> None:
        """Per-site bars of mean |r| and mutual information (original, IC input, IC output);
        black ticks mark what theory predicts for the IC output."""
        names = [s.name for s in self.sites]
        fig = figure(figsize=(max(6.0, 0.3 * len(names) + 2), 7))
        axes = fig.subplots(2, 1, sharex=True)
        for ax, key, label in ((axes[0], "corr", "mean |Pearson r|"), (axes[1], "mi", "mutual information (nats)")):
            series = self._bar_series(key)
            width = 0.8 / len(series)
            for k, (legend, values) in enumerate(series):
                offset = (k - (len(series) - 1) / 2) * width
                ax.bar([i + offset for i in range(len(names))], values, width, label=legend)
            if self.converted:
                ratio = "expected_corr_ratio" if key == "corr" else "expected_mi_ratio"
                theory = [math.nan if s.p is None else getattr(s, ratio) * getattr(s, f"{key}_in") for s in self.sites]
                ax.scatter(
                    range(len(names)), theory, marker="_", color="black", s=150, zorder=3, label="theory for IC out"
                )
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize="small")
        axes[1].set_xticks(range(len(names)), names, rotation=90, fontsize="small")
        fig.suptitle(f"Feature dependence at {'IC sites' if self.converted else 'weight-layer inputs'}")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)

    def _bar_series(self, key: str) -> list[tuple[str, list[float]]]:
        """``(legend, values per site)`` for the bars of ``key`` ("corr" or "mi"), NaN where missing."""

        def values(sites: Iterable[SiteStats | None], field: str) -> list[float]:
            return [math.nan if s is None or getattr(s, field) is None else getattr(s, field) for s in sites]

        series = []
        if self.original is not None:
            series.append(("original", values((self.original_at(s.name) for s in self.sites), f"{key}_in")))
        series.append(("IC in" if self.converted else "input", values(self.sites, f"{key}_in")))
        if self.converted:
            series.append(("IC out", values(self.sites, f"{key}_out")))
        return series
