"""``icrewrite stats MODEL --data DATA``: how dependent the inputs of weight layers are, before and after IC."""
from __future__ import annotations

import argparse
from typing import Any

from .. import convert
from ..train.data import DIGITS
from ..errors import ICRewriteError
from ..files import refuse_overwrite
from ..independence import MAX_BATCHES, MAX_BINS, MAX_PAIRS, MAX_SAMPLES, has_ic_blocks, stats
from ._data import DIGITS_IMG_SIZES, model_loader
from . import (add_command, add_conversion_arguments, add_model_arguments, conversion_options, model_from_args,
               positive_int, progress)



def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "stats",
        summary="measure correlation and mutual information at the IC sites",
        description="Run a few batches of DATA through MODEL in train mode (no weight or statistics change) and "
                    "measure, between pairs of features, the mean |Pearson r| and the mutual information at the "
                    "input and the output of every IC block, next to the theoretical ratios (q = 1 - p for the "
                    "correlation of zero-mean features, q^2 for mutual information). A model without IC blocks is "
                    "measured at the input of every weight layer. With --compare-original, MODEL is an original "
                    "model: it is converted with the conversion options and both are measured at the same "
                    "positions. See docs/independence.md for the estimators and their error.",
        example="icrewrite stats resnet18 --data digits --compare-original --png stats.png",
    )
    add_model_arguments(parser)
    parser.add_argument("--data", default=DIGITS, metavar="DATA",
                        help="'digits' (embedded, default), an ImageFolder directory or a timm dataset NAME:ROOT")
    parser.add_argument("--img-size", type=positive_int, metavar="PIXELS",
                        help=f"image size (default: {DIGITS_IMG_SIZES['stats']} for digits, else the model's input size)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    parser.add_argument("--batches", type=positive_int, default=MAX_BATCHES,
                        help=f"batches to measure (default {MAX_BATCHES})")
    parser.add_argument("--pairs", type=positive_int, default=MAX_PAIRS,
                        help=f"feature pairs per site: all pairs among k random features (default {MAX_PAIRS})")
    parser.add_argument("--samples", type=positive_int, default=MAX_SAMPLES,
                        help=f"positions per batch and site, drawn at random (default {MAX_SAMPLES})")
    parser.add_argument("--bins", type=positive_int, default=MAX_BINS,
                        help=f"most quantile bins per feature for mutual information (default {MAX_BINS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches, pairs, positions and dropout masks")
    parser.add_argument("--png", metavar="PATH", help="also write per-layer bar charts to PATH")
    parser.add_argument("--compare-original", action="store_true",
                        help="convert MODEL (with the conversion options) and measure the original alongside")
    add_conversion_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.png:
        refuse_overwrite(args.png, force=True)  # a writable place for the chart, before the measurement
    model = model_from_args(args)
    converted = has_ic_blocks(model)
    original = None
    if args.compare_original:
        if converted:
            raise ICRewriteError(f"--compare-original converts MODEL, but {args.model} is already converted: "
                                 "name the original model (a timm name, with --checkpoint) instead")
        progress("converting")
        original, model = model, convert(model, **conversion_options(args))
    elif not converted:
        progress(f"{args.model} has no IC blocks: measuring the inputs of its weight layers "
                 "(--compare-original converts it and measures both)")
    loader = model_loader(model, args.data, "train", args.batch_size, img_size=args.img_size,
                          digits_img_size=DIGITS_IMG_SIZES["stats"], augment=False, seed=args.seed)
    report = stats(model, loader, original=original, max_batches=args.batches, max_pairs=args.pairs,
                   max_samples=args.samples, max_bins=args.bins, seed=args.seed, progress=True)
    print(report)
    if args.png:
        report.write_png(args.png)
        print(f"wrote {args.png}")
    return 0
