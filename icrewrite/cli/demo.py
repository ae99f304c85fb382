"""``icrewrite demo``: train a timm model and its IC version side by side on the embedded digits."""
from __future__ import annotations

import argparse
from typing import Any

from . import add_command, progress


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "demo",
        summary="train a model and its IC version side by side on digits (CPU, about 3 minutes)",
        description="Build a small timm ResNet, convert it into an IC network, train both from the same weights on "
                    "scikit-learn's embedded handwritten digits (no download), print a table (test accuracy, final "
                    "loss, time per epoch), write a loss/accuracy plot, and export the IC model to ONNX, checked in "
                    "onnxruntime. --quick runs a tiny version in well under a minute.",
        example="icrewrite demo --out demo-out",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model for one epoch at 16x16: a smoke test")
    parser.add_argument("-o", "--out", default="demo-out", metavar="DIR",
                        help="output folder, empty or absent (default demo-out)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.demo import FULL, QUICK, run_demo  # heavy: loaded only when the command runs

    result = run_demo(args.out, QUICK if args.quick else FULL, progress=args.progress, log=progress)
    print(result.comparison.table())
    print(result.onnx)
    print(f"plot: {result.comparison.plot}")
    return 0
