"""Time of ``icrewrite.convert`` against ``timm.create_model`` (the target: ratio <= 1.0).

Both are timed interleaved in one process, median of rounds, since absolute times on shared
machines mean little. ``convert`` includes its deep copy, tracing, planning and applying.

    python benchmarks/convert_speed.py [--rounds 5] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

import icrewrite

MODELS = ["resnet50", "efficientnet_b0", "vit_small_patch16_224"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, rounds: int) -> tuple[float, float, float]:
    """Median create time, median convert time and their ratio for one model."""
    model = timm.create_model(name, pretrained=False)
    create, convert = [], []
    for _ in range(rounds):
        create.append(timed(lambda: timm.create_model(name, pretrained=False)))
        convert.append(timed(lambda: icrewrite.convert(model)))
    c, v = statistics.median(create), statistics.median(convert)
    return c, v, v / c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="one small model, two rounds (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models, rounds = (["resnet18"], 2) if args.quick else (MODELS, args.rounds)
    print(f"torch {torch.__version__}, timm {timm.__version__}, icrewrite {icrewrite.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}, threads {args.threads}, rounds {rounds}")
    print(f"{'model':<24} {'create_model s':>14} {'convert s':>10} {'convert/create':>15}")
    for name in models:
        c, v, ratio = measure(name, rounds)
        print(f"{name:<24} {c:>14.3f} {v:>10.3f} {ratio:>15.2f}")


if __name__ == "__main__":
    main()
