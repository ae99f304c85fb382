"""How good and how well calibrated a classifier is on a dataset, with Monte-Carlo-dropout uncertainty.

``validate(model, loader, mc_samples=N)`` evaluates ``model`` once deterministically (eval
mode) and, with ``mc_samples`` N > 0, N more times with every dropout module active and
BatchNorm in eval mode (Monte-Carlo dropout: the mean of the N predictive distributions is
the prediction). An IC network has dropout before every weight layer, so it is an MC-dropout
model as it stands. For each pass it reports :class:`Metrics`:

- top-1 and top-5 accuracy (%);
- loss: the mean cross-entropy of the logits, as timm's ``validate.py`` reports it (for MC
  dropout: averaged over the N passes);
- NLL: minus the mean log-probability the prediction gives the true label (for MC dropout:
  of the mean of the N distributions; for one deterministic pass it equals the loss);
- ECE: expected calibration error over 15 equal-width confidence bins (the top-1
  probability), ``sum_b n_b / n * |accuracy_b - confidence_b|``;
- Brier score: ``mean_i sum_k (p_ik - [k == y_i])^2`` (0 perfect, 2 worst);
- for MC dropout also the mean predictive entropy ``H(mean_k p_k)`` and the mean mutual
  information between prediction and weights (BALD): ``H(mean_k p_k) - mean_k H(p_k)``, in nats.

The metric functions (:func:`metrics`, :func:`expected_calibration_error`, ...) are pure
NumPy functions of probabilities and labels, used by ``compare`` as well.
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ICRewriteError
from ..files import atomic_path
from ..compat import forked_rng
from ..rewrite import modes_kept
from .data import model_class_names

__all__ = ["ECE_BINS", "Metrics", "Validation", "ValidationError", "brier_score", "class_names_of",
           "expected_calibration_error", "metrics", "reliability_bins", "validate"]

ECE_BINS = 15


class ValidationError(ICRewriteError):
    """A model cannot be validated as asked (a bad sample count, labels outside the classifier)."""


@dataclass(frozen=True)
class Metrics:
    """What one way of predicting (one deterministic pass, or the mean of MC-dropout passes) scores."""

    top1: float  # %
    top5: float  # %
    loss: float  # mean cross-entropy of the logits (MC: averaged over passes)
    nll: float  # -mean log p(label) of the predictive distribution
    ece: float  # expected calibration error, a fraction in [0, 1]
    brier: float
    entropy: float | None = None  # MC only: mean predictive entropy, nats
    mutual_information: float | None = None  # MC only: mean BALD mutual information, nats

    def format(self) -> str:
        text = (f"top-1 {self.top1:.2f}%  top-5 {self.top5:.2f}%  loss {self.loss:.4f}  NLL {self.nll:.4f}  "
                f"ECE {100 * self.ece:.2f}%  Brier {self.brier:.4f}")
        if self.entropy is not None:
            text += f"  entropy {self.entropy:.4f}  MI {self.mutual_information:.4f}"
        return text


def _probabilities(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if probabilities.ndim != 2 or labels.shape != (len(probabilities),) or not len(labels):
        raise ValidationError(f"need probabilities (samples, classes) and one label per sample, got shapes "
                              f"{probabilities.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= probabilities.shape[1]:
        raise ValidationError(f"labels must be class indices 0..{probabilities.shape[1] - 1} of the model's "
                              f"{probabilities.shape[1]} outputs; the data has {labels.min()}..{labels.max()}")
    return probabilities, labels.astype(np.int64)


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin ``((b-1)/bins, b/bins]`` (the first also takes 0): the
    number of samples, their mean confidence (top-1 probability) and their accuracy (NaN when empty)."""
    probabilities, labels = _probabilities(probabilities, labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / counts
        accuracy = np.bincount(index, correct.astype(np.float64), minlength=bins) / counts
    return counts, mean_confidence, accuracy


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """``sum_b n_b / n * |accuracy_b - confidence_b|`` over ``bins`` equal-width confidence bins."""
    counts, confidence, accuracy = reliability_bins(probabilities, labels, bins)
    filled = counts > 0
    return float(np.sum(counts[filled] * np.abs(accuracy[filled] - confidence[filled])) / counts.sum())


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: ``mean_i sum_k (p_ik - [k == y_i])^2``."""
    probabilities, labels = _probabilities(probabilities, labels)
    onehot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - onehot) ** 2, axis=1)))


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy per row in nats, with 0 log 0 = 0."""
    logs = np.log(np.where(probabilities > 0, probabilities, 1.0))
    return -np.sum(probabilities * logs, axis=-1)


def metrics(probabilities: np.ndarray, labels: np.ndarray, *, loss: float | None = None,
            pass_entropy: np.ndarray | None = None) -> Metrics:
    """:class:`Metrics` of predictive ``probabilities`` (samples x classes) for ``labels``.

    ``loss``: the mean cross-entropy of the logits, when known (default: the NLL).
    ``pass_entropy``: per sample, the mean entropy of the individual MC passes; with it the
    predictive entropy and mutual information are reported too.
    """
    probabilities, labels = _probabilities(probabilities, labels)
    true = probabilities[np.arange(len(labels)), labels]
    nll = float(-np.mean(np.log(np.maximum(true, np.finfo(np.float64).tiny))))
    top = min(5, probabilities.shape[1])
    top5 = np.any(np.argsort(-probabilities, axis=1, kind="stable")[:, :top] == labels[:, None], axis=1)
    entropy = mutual_information = None
    if pass_entropy is not None:
        predictive = _entropy(probabilities)
        entropy = float(predictive.mean())
        mutual_information = float(np.mean(np.maximum(predictive - pass_entropy, 0.0)))
    return Metrics(top1=100.0 * float(np.mean(probabilities.argmax(axis=1) == labels)),
                   top5=100.0 * float(np.mean(top5)), loss=nll if loss is None else loss, nll=nll,
                   ece=expected_calibration_error(probabilities, labels), brier=brier_score(probabilities, labels),
                   entropy=entropy, mutual_information=mutual_information)


def _dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout modules (``torch.nn``'s, IC blocks' included) with p > 0: what MC sampling switches on."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def class_names_of(model: nn.Module, classes: int) -> list[str]:
    """The names of the model's ``classes`` outputs as recorded with it (``finetune`` records its
    data's: :func:`icrewrite.train.data.model_class_names`), else ``"0"``, ``"1"``, ..."""
    names = model_class_names(model)
    return names if names is not None and len(names) == classes else [str(k) for k in range(classes)]


@dataclass
class Validation:
    """What :func:`validate` measured; ``probabilities`` and ``mc_probabilities`` are per sample."""

    deterministic: Metrics
    mc: Metrics | None
    mc_samples: int
    dropout_modules: int  # dropout modules with p > 0 that MC sampling activates
    class_names: list[str]
    labels: np.ndarray = field(repr=False)
    probabilities: np.ndarray = field(repr=False)
    mc_probabilities: np.ndarray | None = field(default=None, repr=False)

    @property
    def samples(self) -> int:
        return len(self.labels)

    def report(self) -> str:
        """The figures in a few lines of text."""
        lines = [f"{self.samples} samples, {len(self.class_names)} classes",
                 f"deterministic:      {self.deterministic.format()}"]
        if self.mc is not None:
            lines.append(f"MC dropout ({self.mc_samples:>3}):   {self.mc.format()}")
            if not self.dropout_modules:
                lines.append("the model has no active dropout (no dropout module with p > 0): MC sampling equals "
                             "the deterministic pass")
        return "\n".join(lines)

    def write_predictions(self, path: str | os.PathLike) -> Path:
        """A CSV file: one row per sample, its ``label`` and one probability column per class (named by
        class name); with MC dropout the probabilities are the MC mean, else the deterministic ones."""
        probabilities = self.probabilities if self.mc_probabilities is None else self.mc_probabilities
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["label", *self.class_names])
                for label, row in zip(self.labels.tolist(), probabilities.tolist()):
                    writer.writerow([label, *(repr(p) for p in row)])
        return Path(path)

    def plot(self, path: str | os.PathLike) -> Path:
        """A reliability diagram (accuracy against confidence per bin) of each pass, as a PNG."""
        from ..plot import plot_reliability

        curves = {"deterministic": reliability_bins(self.probabilities, self.labels)}
        eces = {"deterministic": self.deterministic.ece}
        if self.mc is not None and self.mc_probabilities is not None:
            label = f"MC dropout ({self.mc_samples} samples)"
            curves[label] = reliability_bins(self.mc_probabilities, self.labels)
            eces[label] = self.mc.ece
        return plot_reliability(curves, eces, path)


def _mc_passes(model: nn.Module, dropouts: Sequence[nn.Module], images: torch.Tensor, targets: torch.Tensor,
               samples: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``samples`` passes over one batch with ``dropouts`` active (the rest in eval mode): the mean
    distribution, each sample's mean per-pass entropy, and the summed per-pass cross-entropy / samples."""
    for module in dropouts:
        module.train()
    total = torch.zeros((), dtype=torch.float64)
    entropy = torch.zeros(len(images), dtype=torch.float64)
    loss = 0.0
    try:
        for _ in range(samples):
            logits = model(images).float()
            p = logits.softmax(dim=1).double().cpu()
            total = total + p
            entropy += torch.special.entr(p).sum(dim=1)
            loss += F.cross_entropy(logits, targets, reduction="sum").item()
    finally:
        for module in dropouts:
            module.eval()
    return total / samples, entropy / samples, loss / samples


def _device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader | Sequence[tuple[torch.Tensor, torch.Tensor]], *,
             mc_samples: int = 0, seed: int = 0, device: str | torch.device | None = None,
             predictions: str | os.PathLike | None = None, png: str | os.PathLike | None = None) -> Validation:
    """Evaluate ``model`` on ``loader``'s ``(images, labels)`` batches: one deterministic pass and,
    with ``mc_samples`` N > 0, N passes with dropout active and BatchNorm in eval mode (seeded by
    ``seed``; the caller's RNG state is kept). ``model`` is left in the mode it was in.
    ``predictions`` writes the per-sample CSV, ``png`` the reliability diagram."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 0:
        raise ValidationError(f"mc_samples must be a whole number >= 0, got {mc_samples!r}")
    device = _device(model, device)
    labels, probs, losses = [], [], []
    mc_probs, mc_losses, pass_entropies = [], [], []
    dropouts = _dropout_modules(model)
    seeded = forked_rng(device, seed) if mc_samples else contextlib.nullcontext()
    with modes_kept(model), seeded:
        model.to(device).eval()
        for images, targets in loader:
            images, targets = images.to(device), torch.as_tensor(targets).to(device)
            logits = model(images).float()
            if logits.ndim != 2:
                raise ValidationError(f"the model returns a tensor of shape {tuple(logits.shape)}; validate "
                                      "needs class scores (batch, classes), as a classifier gives")
            if targets.min() < 0 or targets.max() >= logits.shape[1]:
                raise ValidationError(f"the data has labels up to {int(targets.max())} but the model has "
                                      f"{logits.shape[1]} outputs; give a model with as many classes as the data")
            labels.append(targets.cpu())
            probs.append(logits.softmax(dim=1).double().cpu())
            losses.append(F.cross_entropy(logits, targets, reduction="sum").item())
            if mc_samples:
                mean, entropy, loss = _mc_passes(model, dropouts, images, targets, mc_samples)
                mc_probs.append(mean)
                pass_entropies.append(entropy)
                mc_losses.append(loss)
    if not labels:
        raise ValidationError("the data has no samples")
    label_array = torch.cat(labels).numpy()
    probabilities = torch.cat(probs).numpy()
    names = class_names_of(model, probabilities.shape[1])
    result = Validation(metrics(probabilities, label_array, loss=math.fsum(losses) / len(label_array)), None,
                        mc_samples, len(dropouts), names, label_array, probabilities)
    if mc_samples:
        result.mc_probabilities = torch.cat(mc_probs).numpy()
        result.mc = metrics(result.mc_probabilities, label_array, loss=math.fsum(mc_losses) / len(label_array),
                            pass_entropy=torch.cat(pass_entropies).numpy())
    if predictions is not None:
        result.write_predictions(predictions)
    if png is not None:
        result.plot(png)
    return result
