"""PNG plots: training runs (loss and accuracy per epoch, means over seeds), reliability diagrams,
and the ``figure`` that other reports (``icrewrite.independence``) draw on.

Uses matplotlib's object API (``Figure``, rendered by Agg), not ``pyplot``: no global
state, no display needed, safe in worker processes and on headless machines.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import require
from .files import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figure", "plot_history", "plot_mean_std", "plot_reliability"]

Record = Mapping[str, float]


def figure(**kwargs: object) -> Figure:
    """A new matplotlib ``Figure`` (``pip install 'icrewrite[train]'`` brings matplotlib)."""
    return require("matplotlib.figure", "train").Figure(**kwargs)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def plot_history(runs: Mapping[str, Sequence[Record]], path: str | os.PathLike) -> Path:
    """Loss (left) and accuracy (right) per epoch, one colour per run.

    ``runs`` maps a run's label to its per-epoch records (``epoch``, ``train_loss``,
    ``val_loss``, ``train_acc``, ``val_acc``, as in ``metrics.jsonl``); training curves
    are dashed, validation curves solid.
    """
    fig = figure(figsize=(10, 4))
    loss_ax, acc_ax = fig.subplots(1, 2)
    for colour, (label, records) in enumerate(runs.items()):
        epochs = [r["epoch"] for r in records]
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in records], f"C{colour}--", label=f"{label} train")
            ax.plot(epochs, [r[f"val_{metric}"] for r in records], f"C{colour}-", label=f"{label} validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_mean_std(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | os.PathLike) -> Path:
    """Mean +/- standard deviation bands over seeds, one panel per metric.

    ``curves[metric][label]`` is an array of shape ``(seeds, epochs)``.
    """
    fig = figure(figsize=(5 * len(curves), 4))
    axes = np.atleast_1d(fig.subplots(1, len(curves)))
    for ax, (metric, by_label) in zip(axes, curves.items()):
        for colour, (label, values) in enumerate(by_label.items()):
            epochs = np.arange(1, values.shape[1] + 1)
            mean, std = values.mean(axis=0), values.std(axis=0)
            ax.plot(epochs, mean, f"C{colour}-", label=label)
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{colour}", alpha=0.2)
        ax.set(xlabel="epoch", title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], eces: Mapping[str, float],
                     path: str | os.PathLike) -> Path:
    """A reliability diagram: accuracy against mean confidence per confidence bin, one colour per
    way of predicting, with the diagonal of perfect calibration; below it, the samples per bin.

    ``curves[label]`` is ``(counts, mean confidence, accuracy)`` per bin (empty bins NaN), as
    ``icrewrite.train.validate.reliability_bins`` returns; ``eces[label]`` goes in the legend.
    """
    fig = figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    top.plot([0, 1], [0, 1], "k:", label="perfect calibration")
    for colour, (label, (counts, confidence, accuracy)) in enumerate(curves.items()):
        filled = counts > 0
        top.plot(confidence[filled], accuracy[filled], f"C{colour}o-",
                 label=f"{label} (ECE {100 * eces[label]:.2f}%)")
        edges = np.linspace(0, 1, len(counts) + 1)
        bottom.stairs(counts, edges, color=f"C{colour}", label=label)
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title="Reliability")
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="samples")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize="small")
    return _save(fig, path)
