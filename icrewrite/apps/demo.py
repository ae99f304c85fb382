"""The demo: a small timm ResNet and its IC version compared over seeds on the embedded digits.

A :func:`~icrewrite.train.compare.compare` of ``baseline`` and ``ic`` (p = 0.05, ``init="fresh"``,
as in the paper for training from scratch), then the first seed's trained IC model exported
to ONNX and checked in onnxruntime.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import create_timm_model, load
from ..deploy import ExportReport, export_onnx
from ..train.compare import Comparison, Log, compare
from ..train.data import digits_loaders

__all__ = ["DemoConfig", "DemoResult", "FULL", "QUICK", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains: by default a quarter-width resnet18 (0.7M parameters) at 16x16
    (the digits are 8x8 images), 3 seeds of 6 epochs for each of the two models."""

    model: str = "resnet18"
    model_args: dict[str, Any] = field(default_factory=lambda: {"channels": (16, 32, 64, 128), "stem_width": 16})
    img_size: int = 16
    epochs: int = 6
    seeds: int = 3
    timing_rounds: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    variants: tuple[str, ...] = ("baseline", "ic")


FULL = DemoConfig()
QUICK = DemoConfig(model_args={"channels": (8, 16, 32, 64), "stem_width": 8}, epochs=1, seeds=2, timing_rounds=3)


@dataclass
class DemoResult:
    comparison: Comparison
    onnx: ExportReport


def run_demo(out_dir: str | os.PathLike, config: DemoConfig = FULL, *, progress: bool = True, verbose: bool = False,
             log: Log = print) -> DemoResult:
    """Compare ``config.model`` with its IC version on digits in ``out_dir`` (empty or absent), then
    export seed 0's trained IC model to ``out_dir/ic.onnx`` (``export_onnx`` checks it in
    onnxruntime and raises ``ExportError`` if it differs). One progress bar (``progress``); with
    ``verbose`` a line per run and per epoch as well."""
    out_dir = Path(out_dir)
    train, test = digits_loaders(config.batch_size, config.img_size)
    size = f"{config.img_size}x{config.img_size}"
    log(f"{config.model} and its IC version, {config.seeds} seeds of {config.epochs} epoch(s) on digits at {size}")
    comparison = compare(
        lambda: create_timm_model(config.model, num_classes=10, **config.model_args), train, test, out_dir,
        variants=config.variants, seeds=config.seeds, timing_rounds=config.timing_rounds,
        title="icrewrite demo: baseline vs IC on digits",
        description=f"{config.model} {config.model_args} from scratch on digits at {size}, {config.epochs} epochs, "
                    f"batch {config.batch_size}, AdamW lr {config.lr:g}, cosine schedule.",
        verbose=verbose, log=log, epochs=config.epochs, lr=config.lr, progress=progress)
    log("exporting seed 0's IC model to ONNX and checking it in onnxruntime")
    ic = load(comparison.run_dir("ic", 0) / "last.safetensors")
    report = export_onnx(ic, out_dir / "ic.onnx", input_size=(3, config.img_size, config.img_size))
    return DemoResult(comparison, report)
