"""``icrewrite compare MODEL --data DATA --seeds N --variants baseline,ic,... -o OUT``: does IC help, over seeds?"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..train.data import num_classes
from ..train.loop import is_primary
from . import add_command, add_model_arguments, at_least, model_from_args, positive_int, progress
from .finetune import add_training_arguments, config_from_args, loaders_from_args, with_classes


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "compare",
        summary="train a model and IC variants of it over several seeds; intervals and a verdict per variant",
        description="Train every variant of MODEL on DATA once per seed (seeds 0..N-1). Per seed the model is built "
                    "once (seeded: new initial weights per seed unless MODEL brings its own) and every variant "
                    "starts from it and sees the same data order and augmentation. Each run is a `finetune` run in "
                    "OUT/seed-S/VARIANT/. Time per step comes from a short interleaved timing phase per seed. "
                    "Writes OUT/report.md (means with 95% t-intervals over seeds of accuracy, NLL, ECE and Brier "
                    "score, and with --mc-samples of the MC-dropout figures; per variant the paired difference to the "
                    "baseline with a verdict: better, worse, or not resolved at N seeds, decided for all variants "
                    "and metrics together by Holm's step-down procedure at 5% family-wise error), OUT/compare.json "
                    "and OUT/compare.png. A killed comparison continues with the same command plus --resume. "
                    "Under torchrun every run trains with DistributedDataParallel.",
        example="icrewrite compare resnet18 --num-classes 10 --data digits --img-size 16 --seeds 3 --epochs 6 "
                "--variants baseline,ic,ic:p=0.1,ic:layout=ic-conv-relu -o cmp",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder (empty or absent)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the comparison in OUT (with the same variants): finished runs are read back, "
                             "unfinished ones resume")
    parser.add_argument("--variants", default="baseline,ic", metavar="LIST",
                        help="comma-separated: baseline, ic, or ic:KEY=VALUE,... with KEY a conversion option (p, "
                             "init, layout, stem, head, exclude with | between patterns; any field of "
                             "icrewrite.Options); IC variants default to init=fresh; variants are told apart by "
                             "their options, not their spelling (default baseline,ic)")
    parser.add_argument("--seeds", type=positive_int, default=3, metavar="N", help="seeds per variant (default 3)")
    parser.add_argument("--target", type=float, default=95.0, metavar="PCT",
                        help="test accuracy (%%) for 'epochs to target' (default 95)")
    parser.add_argument("--mc-samples", type=at_least(0), default=0, metavar="N",
                        help="also evaluate each run's final model as the mean of N Monte-Carlo-dropout passes "
                             "(dropout on, BatchNorm in eval mode) and compare its accuracy, NLL, ECE and Brier "
                             "score (default 0: off)")
    parser.add_argument("--timing-rounds", type=positive_int, default=20, metavar="N",
                        help="interleaved timing rounds per seed (default 20)")
    parser.add_argument("--verbose", action="store_true",
                        help="also print a line per run and per epoch (default: one progress bar for the comparison)")
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.compare import check_out_dir, compare, parse_variants  # heavy: loaded only when the command runs

    # a bad spec, a folder in use or a resume with other variants is an error before any model is loaded
    check_out_dir(Path(args.out), args.resume, parse_variants(args.variants))
    torch.manual_seed(0)
    loaders = loaders_from_args(args, model_from_args(args))
    classes = num_classes(loaders[0].dataset)
    options = {k: v for k, v in dataclasses.asdict(config_from_args(args)).items() if k not in ("seed", "resume")}
    description = (f"{args.model} on {args.data}, {args.epochs} epoch(s), batch {args.batch_size} per process, "
                   f"{args.opt} lr {args.lr:g}, schedule {args.sched}.")
    comparison = compare(lambda: with_classes(model_from_args(args), classes), *loaders, args.out,
                         variants=args.variants, seeds=args.seeds, target=args.target,
                         timing_rounds=args.timing_rounds, mc_samples=args.mc_samples, resume=args.resume,
                         verbose=args.verbose, description=description, log=progress,
                         **options)
    if is_primary():
        print("\n".join(comparison.verdicts().values()))
        print(comparison.family())
        print(f"wrote {args.out}/report.md, compare.json, compare.png")
    return 0
