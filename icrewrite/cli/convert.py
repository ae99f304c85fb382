"""``icrewrite convert MODEL -o OUT``: convert a model and write the IC checkpoint."""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterable
from typing import Any

from torch import nn
from tqdm import tqdm

from .. import convert, verify
from ..checkpoint import check_writable, example_input, save
from ..errors import ConversionError
from ..rewrite import TOLERANCE
from . import (add_command, add_conversion_arguments, add_model_arguments, conversion_options, given_conversion_flags,
               model_from_args, positive_int, progress)
from .plan import read_plan

CALIBRATION_BATCH_SIZE = 32


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "convert",
        summary="convert a model and write the IC checkpoint",
        description="Convert MODEL (with --checkpoint weights) into an IC network and write it to OUT, then print "
                    "the parity report. OUT ending in .safetensors is one file; any other OUT is a folder in the "
                    "timm/Hugging Face layout (config.json + model.safetensors). Either is read back by "
                    "icrewrite.load(OUT) and `icrewrite verify OUT`.",
        example="icrewrite convert resnet50 --checkpoint weights.pth.tar -o resnet50_ic --verify",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="file (.safetensors) or folder to write")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_conversion_arguments(parser)
    parser.add_argument("--plan", metavar="PATH",
                        help="convert by this plan (written by `icrewrite plan MODEL --json PATH`) instead of "
                             "planning again; the plan holds its options, so none of the options above go with it")
    parser.add_argument("--calibrate", metavar="DATA",
                        help="set IC statistics from real images: 'digits', an ImageFolder directory or a timm "
                             "dataset NAME:ROOT (with --init preserve)")
    parser.add_argument("--calibrate-batches", type=positive_int, default=8, metavar="N",
                        help=f"calibration batches of {CALIBRATION_BATCH_SIZE} images (default 8)")
    parser.add_argument("--verify", action="store_true",
                        help="check that the converted model computes the original function in eval mode; "
                             "nothing is written if it does not")
    parser.set_defaults(func=run)


def calibration_batches(data: str, model: nn.Module, batches: int) -> Iterable:
    """``batches`` batches of ``data`` at ``model``'s input size and normalisation, with a progress bar."""
    from ._data import model_loader  # scikit-learn and timm's datasets: only for commands that read data

    loader = model_loader(model, data, "train", CALIBRATION_BATCH_SIZE, augment=False)
    return tqdm(itertools.islice(loader, batches), total=min(batches, len(loader)), desc="calibrating",
                unit="batch", file=sys.stderr)


def _conversion(args: argparse.Namespace) -> dict[str, Any]:
    """``convert``'s keyword arguments: the plan of ``--plan``, or the conversion options."""
    if args.plan is None:
        return conversion_options(args)
    flags = given_conversion_flags(args)
    if flags:
        raise ConversionError(f"--plan converts with the plan's own options; {', '.join(flags)} cannot be given "
                              "with it (make the plan with them: `icrewrite plan MODEL ... --json PATH`)")
    return {"plan": read_plan(args.plan)}


def run(args: argparse.Namespace) -> int:
    check_writable(args.output, force=args.force)  # before minutes of work, not after
    conversion = _conversion(args)
    original = model_from_args(args)
    calibration = calibration_batches(args.calibrate, original, args.calibrate_batches) if args.calibrate else None
    progress("converting" + (f" by the plan in {args.plan}" if args.plan else ""))
    converted = convert(original, calibration=calibration, calibration_batches=args.calibrate_batches, **conversion)
    if args.verify:
        progress("comparing eval-mode outputs")
    report = verify(original, converted, example_input(original) if args.verify else None)
    print(report)
    if not report.ok:
        why = report.non_finite or f"relative error {report.max_rel_error:.3g} > {TOLERANCE:g}"
        raise ConversionError(f"the converted model does not compute the original function ({why}); nothing was "
                              "written")
    progress(f"writing {args.output}")
    save(converted, args.output, parity=report, force=args.force)
    print(f"wrote {args.output}")
    return 0
