"""``icrewrite validate MODEL --data DATA [--mc-samples N]``: accuracy, calibration and MC-dropout uncertainty."""
from __future__ import annotations

import argparse
from typing import Any

from ..files import refuse_overwrite
from ..train.data import DIGITS, EVAL_SPLITS
from . import add_command, add_model_arguments, at_least, model_from_args, positive_int, progress
from ._data import DIGITS_IMG_SIZES, loader_workers, model_img_size, model_loader


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "validate",
        summary="top-1/top-5, loss, NLL, calibration (ECE, Brier) and MC-dropout uncertainty on a dataset",
        description="Evaluate MODEL (converted or not) on the validation split of DATA in eval mode: top-1 and "
                    "top-5 accuracy, loss (cross-entropy), NLL, ECE (15 equal-width confidence bins) and Brier "
                    "score. With --mc-samples N, also the mean of N passes with every dropout module active and "
                    "BatchNorm in eval mode (Monte-Carlo dropout; an IC network has dropout before every weight "
                    "layer), with the same figures plus the mean predictive entropy and the mutual information "
                    "(BALD). --predictions writes one CSV row per sample (label and class probabilities), --png a "
                    "reliability diagram.",
        example="icrewrite validate runs/r18_ic/best.safetensors --data digits --mc-samples 20 --png rel.png",
    )
    add_model_arguments(parser)
    parser.add_argument("--data", default=DIGITS, metavar="DATA",
                        help="'digits' (embedded, default), an ImageFolder directory (its validation split: val/ "
                             "or the fixed 20%% hold-out) or a timm dataset NAME:ROOT")
    parser.add_argument("--split", default="validation", choices=EVAL_SPLITS, help="split to read (default validation)")
    parser.add_argument("--img-size", type=positive_int, metavar="PIXELS",
                        help=f"image size (default: {DIGITS_IMG_SIZES['finetune']} for digits, the size finetune trains "
                             "at; else the model's input size)")
    parser.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="default 64")
    parser.add_argument("--workers", type=at_least(0), metavar="N",
                        help="data-loading worker processes (default: 0 for digits, else 4)")
    parser.add_argument("--mc-samples", type=at_least(0), default=0, metavar="N",
                        help="also N Monte-Carlo-dropout passes (dropout on, BatchNorm in eval mode); default 0")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dropout masks (default 0)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--predictions", metavar="FILE.csv",
                        help="write one row per sample: label and one probability column per class (the MC mean "
                             "with --mc-samples)")
    parser.add_argument("--png", metavar="FILE", help="write a reliability diagram")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..train.validate import validate  # heavy: loaded only when the command runs

    for path in (args.predictions, args.png):
        if path:
            refuse_overwrite(path, force=True)  # a writable place for it, before the evaluation
    model = model_from_args(args)
    img_size = model_img_size(model, args.data, args.img_size, DIGITS_IMG_SIZES["finetune"])
    progress(f"reading the {args.split} split of {args.data} at {img_size}x{img_size}")
    loader = model_loader(model, args.data, args.split, args.batch_size, img_size=img_size,
                          num_workers=loader_workers(args.data, args.workers))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = validate(model, loader, mc_samples=args.mc_samples, seed=args.seed, device=device,
                      predictions=args.predictions, png=args.png)
    print(result.report())
    for path in (args.predictions, args.png):
        if path:
            print(f"wrote {path}")
    return 0
