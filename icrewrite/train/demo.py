"""Train a model and its IC version side by side; the demo does it on the embedded digits.

Both start from the same weights (conversion copies them), see the same batches in the
same order and are evaluated on the same held-out data. From scratch the IC blocks
start from standard BatchNorm statistics (``init="fresh"``), as in the paper; from
trained weights ``init="preserve"`` keeps the function the model had.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import create_timm_model
from ..deploy import ExportReport, export_onnx
from ..errors import ICRewriteError
from ..rewrite import convert
from .data import digits_loaders
from .loop import FinetuneResult, finetune
from .plot import plot_history

__all__ = ["Comparison", "DemoConfig", "DemoResult", "FULL", "QUICK", "compare", "run_demo"]

Log = Callable[[str], None]


@dataclass
class Comparison:
    """The trained ``"original"`` and ``"IC"`` models, their runs and the plot of both."""

    models: dict[str, nn.Module]
    runs: dict[str, FinetuneResult]
    plot: Path

    def table(self) -> str:
        """Parameters, final and best test accuracy, final training loss and seconds per epoch."""
        header = f"{'model':<10}{'parameters':>12}{'test acc':>10}{'best':>8}{'train loss':>12}{'s/epoch':>9}"
        rows = [header, "-" * len(header)]
        for name, run in self.runs.items():
            parameters = sum(p.numel() for p in self.models[name].parameters())
            seconds = sum(r["epoch_time_s"] for r in run.history) / len(run.history)
            rows.append(f"{name:<10}{parameters:>12,}{run.final['val_acc']:>9.2f}%{run.best_acc:>7.2f}%"
                        f"{run.final['train_loss']:>12.4f}{seconds:>9.1f}")
        return "\n".join(rows)


def _require_empty(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ICRewriteError(f"{out_dir} is not empty; remove it or choose another output folder")


def compare(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    out_dir: str | os.PathLike,
    *,
    p: float = 0.05,
    init: str = "fresh",
    log: Log = print,
    **finetune_options: Any,
) -> Comparison:
    """Train ``model`` and ``convert(model, p=p, init=init)`` with the same options.

    ``out_dir`` (empty or absent) gets ``original/`` and ``ic/``, one :func:`~icrewrite.finetune`
    run each, and ``comparison.png``. ``model`` itself is trained in place.
    """
    out_dir = Path(out_dir)
    _require_empty(out_dir)
    models = {"original": model, "IC": convert(model, p=p, init=init)}
    runs = {}
    for name, candidate in models.items():
        log(f"training the {name} model")
        runs[name] = finetune(candidate, train_loader, val_loader, out_dir / name.lower(), **finetune_options)
    plot = plot_history({name: run.history for name, run in runs.items()}, out_dir / "comparison.png")
    return Comparison(models, runs, plot)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains: by default a quarter-width resnet18 (0.7M parameters) at 32x32."""

    model: str = "resnet18"
    model_args: dict[str, Any] = field(default_factory=lambda: {"channels": (16, 32, 64, 128), "stem_width": 16})
    img_size: int = 32
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    p: float = 0.05
    seed: int = 0


FULL = DemoConfig()
QUICK = DemoConfig(model_args={"channels": (8, 16, 32, 64), "stem_width": 8}, img_size=16, epochs=1)


@dataclass
class DemoResult:
    comparison: Comparison
    onnx: ExportReport


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = FULL, *, progress: bool = True,
             log: Log = print) -> DemoResult:
    """Compare ``config.model`` with its IC version on digits, then export the IC model to
    ``out_dir/ic.onnx`` (``export_onnx`` checks it in onnxruntime, ``ExportError`` if it differs)."""
    out_dir = Path(out_dir)
    _require_empty(out_dir)
    torch.manual_seed(config.seed)
    model = create_timm_model(config.model, num_classes=10, **config.model_args)  # records its arguments for save
    train, test = digits_loaders(config.batch_size, config.img_size)
    log(f"{config.model} and its IC version, {config.epochs} epoch(s) on digits at {config.img_size}x{config.img_size}")
    comparison = compare(model, train, test, out_dir, p=config.p, log=log, epochs=config.epochs, lr=config.lr,
                         seed=config.seed, progress=progress)
    log("exporting the IC model to ONNX and checking it in onnxruntime")
    report = export_onnx(comparison.models["IC"], out_dir / "ic.onnx", input_size=(3, config.img_size, config.img_size))
    return DemoResult(comparison, report)
