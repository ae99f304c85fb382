"""The paper's comparison at this machine's scale: baseline vs IC networks trained from scratch.

Configurations: the baseline model; IC with p = 0.0 (BatchNorm moved before the weight
layers, no dropout), 0.05 and 0.1 in the default layout; and each other residual-unit
layout that ``icrewrite.convert`` offers, at p = 0.05. Each is trained from the same
initial weights per seed, with the same recipe and data order. Reported per
configuration, over seeds (mean +/- std):

- final and best test accuracy;
- epochs to reach ``--target`` test accuracy (runs that never reach it are counted);
- loss stability: the mean absolute change of the test loss from one epoch to the next
  (lower is steadier), and the largest epoch-to-epoch rise of the training loss.

Writes ``docs/reproduce.md`` (table + settings), ``docs/reproduce.png`` (curves) and
``docs/reproduce.json`` (every run's per-epoch records). Each run lives in ``--runs``
and is resumed when the script is started again, so an interrupted sweep continues.

    python benchmarks/reproduce.py                          # digits at 16x16, 12 epochs, 3 seeds
    python benchmarks/reproduce.py --data ~/data/cifar10_folders --img-size 32 --epochs 30
    python benchmarks/reproduce.py --tiny --out /tmp/r     # a smoke test in about a minute
"""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import icrewrite
from icrewrite.train.data import DIGITS, make_loader, num_classes
from icrewrite.rewrite import LAYOUTS
from icrewrite.train.plot import plot_mean_std
from icrewrite.train import finetune

DEFAULT_LAYOUT = "relu-ic-conv"
MODEL_ARGS = {"channels": (16, 32, 64, 128), "stem_width": 16}  # resnet18 at quarter width: 0.7M parameters


@dataclass(frozen=True)
class Setup:
    """One configuration of the sweep; ``p=None`` is the unconverted baseline."""

    p: float | None = None
    layout: str = DEFAULT_LAYOUT

    @property
    def label(self) -> str:
        return "baseline" if self.p is None else f"IC p={self.p:g} {self.layout}"

    @property
    def slug(self) -> str:
        return "baseline" if self.p is None else f"ic-p{self.p:g}-{self.layout}"


def setups(ps: list[float], layouts: list[str]) -> list[Setup]:
    """Baseline, every ``p`` in the default layout, every other layout at p = 0.05."""
    return [Setup(), *(Setup(p) for p in ps), *(Setup(0.05, layout) for layout in layouts if layout != DEFAULT_LAYOUT)]


def build(setup: Setup, model_name: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=classes, **MODEL_ARGS)
    if setup.p is None:
        return model
    return icrewrite.convert(model, p=setup.p, init="fresh", layout=setup.layout)


def epochs_to(history: list[dict[str, float]], target: float) -> int | None:
    return next((r["epoch"] for r in history if r["val_acc"] >= target), None)


def summarise(histories: list[list[dict[str, float]]], target: float) -> dict[str, Any]:
    """Mean and std over seeds of the figures the table reports."""
    final = np.array([h[-1]["val_acc"] for h in histories])
    best = np.array([max(r["val_acc"] for r in h) for h in histories])
    reached = [e for e in (epochs_to(h, target) for h in histories) if e is not None]
    jitter = np.array([np.abs(np.diff([r["val_loss"] for r in h])).mean() for h in histories])
    rise = np.array([max(0.0, np.diff([r["train_loss"] for r in h]).max()) for h in histories])
    seconds = np.array([np.mean([r["epoch_time_s"] for r in h]) for h in histories])
    return {"final": final, "best": best, "reached": reached, "runs": len(histories), "jitter": jitter,
            "rise": rise, "seconds": seconds}


def pm(values: np.ndarray, digits: int = 2) -> str:
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table(summaries: dict[str, dict[str, Any]], target: float) -> str:
    lines = [f"| configuration | final test acc (%) | best test acc (%) | epochs to {target:g}% | "
             "test-loss jitter | worst train-loss rise | s/epoch |",
             "|---|---|---|---|---|---|---|"]
    for label, s in summaries.items():
        reached = (f"{np.mean(s['reached']):.1f} ({len(s['reached'])}/{s['runs']} runs)" if s["reached"]
                   else f"never (0/{s['runs']})")
        lines.append(f"| {label} | {pm(s['final'])} | {pm(s['best'])} | {reached} | {pm(s['jitter'], 3)} | "
                     f"{pm(s['rise'], 3)} | {s['seconds'].mean():.1f} |")
    return "\n".join(lines)


def verdict(summaries: dict[str, dict[str, Any]]) -> str:
    """One sentence per IC configuration: its final accuracy against the baseline's, in units of their spread."""
    base = summaries["baseline"]["final"]
    sentences = []
    for label, s in summaries.items():
        if label == "baseline":
            continue
        delta = s["final"].mean() - base.mean()
        spread = np.sqrt((s["final"].var() + base.var()) / 2) or 1e-9
        judgement = "within the seed-to-seed spread" if abs(delta) <= spread else (
            "better than the baseline" if delta > 0 else "worse than the baseline")
        sentences.append(f"- {label}: {delta:+.2f} points final test accuracy ({judgement}, spread {spread:.2f}).")
    return "\n".join(sentences)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DIGITS, help="digits (default), an ImageFolder directory or NAME:ROOT")
    parser.add_argument("--model", default="resnet18", help=f"timm ResNet name, built with {MODEL_ARGS}")
    parser.add_argument("--img-size", type=int, default=16, help="digits are 8x8: 16 loses nothing (default 16)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--target", type=float, default=95.0, help="test accuracy (%%) for 'epochs to target'")
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.05, 0.1], help="IC dropout probabilities")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS,
                        help=f"residual-unit layouts (default: all of {', '.join(LAYOUTS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduce"), help="where the runs live (resumable)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the report goes (default docs)")
    parser.add_argument("--tiny", action="store_true", help="8x8, 2 epochs, 2 seeds, p=0.05 only: a smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.img_size, args.epochs, args.seeds, args.p, args.layouts = 8, 2, 2, [0.05], [DEFAULT_LAYOUT]
    torch.set_num_threads(args.threads)

    train = make_loader(args.data, "train", args.batch_size, args.img_size)
    test = make_loader(args.data, "test", 256, args.img_size)
    classes = num_classes(train.dataset)
    sweep_dir = args.runs / f"{Path(args.data).name}-{args.model}-{args.img_size}px"
    histories: dict[str, list[list[dict[str, float]]]] = {}
    for setup in setups(args.p, args.layouts):
        for seed in range(args.seeds):
            print(f"{setup.label}, seed {seed}", flush=True)
            model = build(setup, args.model, classes, seed)
            result = finetune(model, train, test, sweep_dir / f"{setup.slug}-seed{seed}", epochs=args.epochs,
                              lr=args.lr, seed=seed, resume=True, progress=False)
            histories.setdefault(setup.label, []).append(result.history)
    summaries = {label: summarise(h, args.target) for label, h in histories.items()}

    args.out.mkdir(parents=True, exist_ok=True)
    curves = {metric: {label: np.array([[r[key] for r in h] for h in hs]) for label, hs in histories.items()}
              for metric, key in (("test accuracy (%)", "val_acc"), ("test loss", "val_loss"),
                                  ("training loss", "train_loss"))}
    plot_mean_std(curves, args.out / "reproduce.png")
    (args.out / "reproduce.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "histories": histories}, indent=1))
    machine = platform.processor() or platform.machine()
    training_minutes = sum(r["epoch_time_s"] for hs in histories.values() for h in hs for r in h) / 60
    settings = (f"{args.model} {MODEL_ARGS} trained from scratch on {args.data} at {args.img_size}x{args.img_size}, "
                f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} with cosine decay, label "
                f"smoothing 0.1, {args.seeds} seeds (same initial weights and data order per seed across "
                f"configurations). torch {torch.__version__}, timm {timm.__version__}, {machine}, {args.threads} "
                f"thread(s); {training_minutes:.0f} min of training in all. {len(test.dataset)} test images: one "
                f"image is {100 / len(test.dataset):.2f} accuracy points.")
    report = "\n\n".join([
        "# Baseline vs IC, reproduced at small scale", settings, table(summaries, args.target),
        "Against the baseline:\n" + verdict(summaries), f"![curves]({(args.out / 'reproduce.png').name})",
        "Generated by `benchmarks/reproduce.py`; every run's per-epoch records are in `reproduce.json`.",
    ])
    (args.out / "reproduce.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
