"""``icrewrite verify OUT``: rebuild a converted checkpoint and check that it computes what was saved."""
from __future__ import annotations

import argparse
from typing import Any

from .. import verify
from ..checkpoint import CheckpointConfig, check, example_input, load_model, read_checkpoint_config
from ..rewrite import TOLERANCE
from . import EXIT_FAILED, add_command, progress


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "verify",
        summary="rebuild a converted checkpoint and check it",
        description="Rebuild OUT (written by `icrewrite convert`) from the file alone and check that its eval-mode "
                    "output equals the one recorded when it was written. With --original, also compare it with "
                    "the original model. Exit code 0: all checks pass; 1: a check failed; 2: an error.",
        example="icrewrite verify resnet50_ic --original resnet50 --checkpoint weights.pth.tar",
    )
    parser.add_argument("path", metavar="OUT", help="a .safetensors file or folder written by `icrewrite convert`")
    parser.add_argument("--original", metavar="MODEL",
                        help="the model OUT was converted from (a timm name), built with OUT's recorded arguments")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights of --original")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="UNSAFE: unpickle --checkpoint with weights_only=False (runs code in the file)")
    parser.set_defaults(func=run)


def _describe(config: CheckpointConfig) -> str:
    args = ", ".join(f"{k}={v}" for k, v in config.model_args.items())
    options = config.options.to_dict() if config.options is not None else None
    how = ("converted with " + ", ".join(f"{k}={v}" for k, v in options.items())) if options else "not converted"
    return f"{config.architecture}({args}), {how}, written by icrewrite {config.version}"


def run(args: argparse.Namespace) -> int:
    config = read_checkpoint_config(args.path)
    print(f"{args.path}: {_describe(config)}")
    parity = config.parity
    if parity is not None:
        print("recorded at conversion:\n  " + str(parity).replace("\n", "\n  "))
    progress(f"rebuilding {args.path}")
    model, error = check(args.path)
    reproduced = error <= TOLERANCE
    print(f"rebuilt from the file: eval output vs the one recorded at conversion: relative error {error:.3g} "
          f"(tolerance {TOLERANCE:g}): {'reproduced' if reproduced else 'DIFFERENT'}")
    ok = reproduced
    if args.original:
        progress(f"loading {args.original}")
        original = load_model(args.original, checkpoint=args.checkpoint, unsafe_pickle=args.unsafe_pickle,
                              **config.model_args)
        report = verify(original, model, example_input(model))
        print(f"against {args.original}:\n  " + str(report).replace("\n", "\n  "))
        ok = ok and report.ok
    print("verify: ok" if ok else "verify: FAILED")
    return 0 if ok else EXIT_FAILED
