"""The ``icrewrite`` command line; ``icrewrite COMMAND --help`` describes each command.

Every module of this package is a command: it defines ``register(subparsers)``, which
adds its parser with ``set_defaults(func=run)``, and ``run(args) -> int``. Errors meant
for users (``ICRewriteError``) print as one line on stderr with exit code 2; ``--debug``
shows the traceback. Results go to stdout, progress lines and warnings to stderr.

The helpers below give every command the same model and conversion arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import sys
import traceback
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from .. import __version__
from ..errors import ICRewriteError
from ..rewrite import Options

__all__ = [
    "main",
    "build_parser",
    "add_command",
    "add_model_arguments",
    "model_from_args",
    "add_conversion_arguments",
    "conversion_options",
    "given_conversion_flags",
    "progress",
]

EXIT_ERROR = 2  # a user error: bad input, unreadable or unsafe file
EXIT_FAILED = 1  # the command ran but a check it makes failed


def progress(message: str) -> None:
    """One progress line on stderr, so that stdout holds only results."""
    print(f"... {message}", file=sys.stderr, flush=True)


def add_command(subparsers: Any, name: str, *, summary: str, description: str, example: str
                ) -> argparse.ArgumentParser:
    """A command's parser, with its description and an example shown by ``--help``."""
    return subparsers.add_parser(name, help=summary, description=description, epilog=f"example:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL`` and the options that say how to build it (see ``model_from_args``)."""
    parser.add_argument("model", metavar="MODEL",
                        help="a timm model name (resnet50, hf-hub:..., local-dir:...), a timm/Hugging Face folder, "
                             "or a file or folder written by `icrewrite convert`")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights to load into MODEL: .safetensors, .pth, .pth.tar or .bin, a plain state "
                             "dict or one nested under state_dict/model/state_dict_ema")
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier size of MODEL (timm num_classes)")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights (download)")
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="UNSAFE: unpickle --checkpoint with weights_only=False, which runs any code the "
                             "file contains; only for files you trust")


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """The model that ``add_model_arguments`` options describe, via ``checkpoint.load_model``."""
    from ..checkpoint import load_model

    create: dict[str, Any] = {"pretrained": True} if args.pretrained else {}
    if args.num_classes is not None:
        create["num_classes"] = args.num_classes
    create.update(getattr(args, "model_kwargs", None) or {})  # --model-kwargs, where a command has it
    progress(f"loading {args.model}" + (f" with weights from {args.checkpoint}" if args.checkpoint else ""))
    return load_model(args.model, checkpoint=args.checkpoint, unsafe_pickle=args.unsafe_pickle, **create)


def add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    """One option for each field of ``icrewrite.Options`` (see ``conversion_options``): ``--NAME``
    for a value or a flag that is off by default, ``--no-NAME`` for one that is on, and a
    repeatable ``--NAME`` for a tuple."""
    group = parser.add_argument_group("conversion")
    for option in dataclasses.fields(Options):
        flag, help = f"--{option.name.replace('_', '-')}", option.metadata["help"]
        if isinstance(option.default, bool) and option.default:
            group.add_argument(f"--no-{option.name}", dest=option.name, action="store_false", help=f"do not {help}")
        elif isinstance(option.default, bool):
            group.add_argument(flag, action="store_true", help=help)
        elif isinstance(option.default, tuple):
            group.add_argument(flag, action="append", default=[], metavar="PATTERN", help=f"{help} (repeatable)")
        else:
            group.add_argument(flag, type=type(option.default), default=option.default,
                               choices=option.metadata["choices"], help=f"{help} (default {option.default})")


def conversion_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``icrewrite.plan``/``icrewrite.convert`` from the parsed options."""
    return {option.name: getattr(args, option.name) for option in dataclasses.fields(Options)}


_FLAGS = {"p": "--p", "init": "--init", "stem": "--stem", "head": "--no-head", "exclude": "--exclude",
          "layout": "--layout"}  # conversion option -> the flag that sets it


def given_conversion_flags(args: argparse.Namespace) -> list[str]:
    """The conversion flags whose values differ from the defaults (what the user asked to change)."""
    defaults = Options().to_dict()
    given = {**conversion_options(args), "exclude": list(args.exclude)}
    return [_FLAGS[name] for name, value in given.items() if value != defaults[name]]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one sub-parser per command module of this package."""
    parser = argparse.ArgumentParser(
        prog="icrewrite",
        description="Rewrite timm models into Independent-Component (IC) networks: BatchNorm + Dropout "
                    "before every weight layer (Chen et al., arXiv 1905.05928).",
        epilog="example:\n  icrewrite convert resnet50 --checkpoint weights.pth -o resnet50_ic --verify",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}").register(subparsers)
    return parser


def _print_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 success, 1 a check failed, 2 an error)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            return args.func(args)
        except ICRewriteError as err:
            if args.debug:
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            return EXIT_ERROR
