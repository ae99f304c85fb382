"""Time of ``icrewrite.convert`` against ``timm.create_model`` (the target: ratio <= 1.0).

Both are timed back to back in each round (alternating order) in one process, and the
ratio is the median of the per-round ratios, since absolute times on shared machines mean
little. ``convert`` includes its deep copy, tracing, planning and applying.

    python benchmarks/convert_speed.py [--rounds 15] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import timm
import torch

import icrewrite
from machine import cpu_name  # benchmarks/machine.py, beside this script

MODELS = ["resnet50", "efficientnet_b0", "vit_small_patch16_224"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, rounds: int) -> tuple[float, float, float]:
    """Median create time, median convert time, and the median over rounds of their ratio.

    Each round times both back to back, in alternating order, so the per-round ratio
    cancels most of the load drift of a shared machine.
    """
    model = timm.create_model(name, pretrained=False)
    create, convert, ratios = [], [], []
    for i in range(rounds):
        steps = [lambda: timm.create_model(name, pretrained=False), lambda: icrewrite.convert(model)]
        times = [timed(step) for step in (steps if i % 2 == 0 else steps[::-1])]
        c, v = times if i % 2 == 0 else times[::-1]
        create.append(c)
        convert.append(v)
        ratios.append(v / c)
    return statistics.median(create), statistics.median(convert), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one small model, two rounds (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, rounds = (["resnet18"], 2) if args.quick else (MODELS, args.rounds)
    print(f"torch {torch.__version__}, timm {timm.__version__}, icrewrite {icrewrite.__version__}, "
          f"python {platform.python_version()}, {cpu_name()}, load {os.getloadavg()[0]:.1f}, threads {args.threads}, rounds {rounds}")
    print(f"{'model':<24} {'create_model s':>14} {'convert s':>10} {'convert/create':>15}")
    for name in models:
        c, v, ratio = measure(name, rounds)
        print(f"{name:<24} {c:>14.3f} {v:>10.3f} {ratio:>15.2f}")


if __name__ == "__main__":
    main()
