"""``icrewrite demo``: a timm model and its IC version compared over 3 seeds on the embedded digits."""
from __future__ import annotations

import argparse
from typing import Any

from . import add_command, progress


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "demo",
        summary="compare a model and its IC version over 3 seeds on digits (CPU, about 3 minutes)",
        description="Build a small timm ResNet and its IC version and train both, 3 seeds each, from the same "
                    "initial weights per seed on scikit-learn's embedded handwritten digits (no download); print "
                    "test accuracy, loss and step time with 95% intervals over seeds and the verdict in words "
                    "(better, worse, or not resolved at 3 seeds); write report.md, compare.json and compare.png "
                    "(`icrewrite compare` does this for any model and data); export the IC model to ONNX, checked "
                    "in onnxruntime. --quick runs a tiny version in well under a minute.",
        example="icrewrite demo --out demo-out",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 seeds of one epoch: a smoke test")
    parser.add_argument("-o", "--out", default="demo-out", metavar="DIR",
                        help="output folder, empty or absent (default demo-out)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="also print a line per run and per epoch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..apps.demo import FULL, QUICK, run_demo  # heavy: loaded only when the command runs

    result = run_demo(args.out, QUICK if args.quick else FULL, progress=args.progress, verbose=args.verbose,
                      log=progress)
    print(result.comparison.table())
    print("\n".join(result.comparison.verdicts().values()))
    print(result.onnx)
    print(f"report: {result.comparison.out_dir / 'report.md'}, plot: {result.comparison.out_dir / 'compare.png'}")
    return 0
