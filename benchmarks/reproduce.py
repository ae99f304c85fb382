"""The paper's comparison at this machine's scale: baseline vs IC networks trained from scratch.

A thin call of ``icrewrite.train.compare.compare`` with the configurations of the paper's
ablation: the baseline; IC with p = 0 (BatchNorm moved before the weight layers, no
dropout), 0.05 and 0.1 in the default layout (ReLU -> IC -> Conv); and the two other
residual-unit layouts at p = 0.05. Per seed every configuration starts from the same
initial weights and sees the same data; the report gives means with 95% t-intervals over
seeds and, against the baseline, paired differences with a verdict in words.

Writes ``docs/reproduce.md`` (compare's report plus the settings and the measured wall
time), ``docs/reproduce.json`` and ``docs/reproduce.png``. The runs live in ``--runs``; start
the script again after an interruption and it resumes them.

    python benchmarks/reproduce.py                          # digits at 16x16, 12 epochs, 3 seeds
    python benchmarks/reproduce.py --data ~/data/cifar10_folders --img-size 32 --epochs 30
    python benchmarks/reproduce.py --tiny --out /tmp/r     # a smoke test in about a minute
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import timm
import torch

from icrewrite.checkpoint import create_timm_model
from icrewrite.files import atomic_path
from icrewrite.rewrite import LAYOUTS
from icrewrite.train.compare import BASELINE, compare
from icrewrite.train.data import DIGITS, make_loader, num_classes

MODEL_ARGS = {"channels": (16, 32, 64, 128), "stem_width": 16}  # resnet18 at quarter width: 0.7M parameters


def variants(ps: list[float], layouts: list[str]) -> list[str]:
    """Baseline, every ``p`` in the default layout, every other layout at p = 0.05."""
    default = LAYOUTS[0]
    return [BASELINE, *(f"ic:p={p:g}" for p in ps), *(f"ic:layout={layout}" for layout in layouts if layout != default)]


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
        args.img_size, args.epochs, args.seeds, args.p, args.layouts = 8, 2, 2, [0.05], [LAYOUTS[0]]
    torch.set_num_threads(args.threads)

    train = make_loader(args.data, "train", args.batch_size, args.img_size)
    test = make_loader(args.data, "test", 256, args.img_size)
    classes = num_classes(train.dataset)
    runs = args.runs / f"{Path(args.data).name}-{args.model}-{args.img_size}px"
    description = (
        f"{args.model} {MODEL_ARGS} trained from scratch on {args.data} at {args.img_size}x{args.img_size}, "
        f"{args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr:g} with cosine decay, label smoothing "
        f"0.1; IC variants use init fresh. torch {torch.__version__}, timm {timm.__version__}, "
        f"{args.threads} torch thread(s). {len(test.dataset)} test images: one image is "
        f"{100 / len(test.dataset):.2f} accuracy points.")
    started = time.perf_counter()
    comparison = compare(lambda: create_timm_model(args.model, num_classes=classes, **MODEL_ARGS), train, test, runs,
                         variants=variants(args.p, args.layouts), seeds=args.seeds, target=args.target,
                         resume=True, title="Baseline vs IC, reproduced at small scale", description=description,
                         log=lambda line: print(line, file=sys.stderr, flush=True), epochs=args.epochs, lr=args.lr,
                         progress=False, verbose=True)
    minutes = (time.perf_counter() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    for name, target in (("compare.json", "reproduce.json"), ("compare.png", "reproduce.png")):
        shutil.copyfile(runs / name, args.out / target)
    report = comparison.report().replace("(compare.png)", "(reproduce.png)").replace(
        "`compare.json`", "`reproduce.json`").replace("`seed-S/VARIANT/`", f"`{runs}/seed-S/VARIANT/`")
    histories = [h for hs in comparison.histories.values() for h in hs]
    training = sum(r["epoch_time_s"] for h in histories for r in h) / 60
    report += (f"\nGenerated by `benchmarks/reproduce.py` on {platform.machine()} with {os.cpu_count()} cores. "
               f"Training time summed over the {len(histories)} runs: {training:.1f} min; this invocation: "
               f"{minutes:.1f} min wall (runs an earlier invocation finished are read back, not counted).\n")
    with atomic_path(args.out / "reproduce.md") as tmp:
        tmp.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
