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
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from torch import nn

from .. import __version__
from ..errors import ICRewriteError, shortened
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
    "at_least",
    "positive_int",
    "describe_error",
]

EXIT_ERROR = 2  # a user error: bad input, unreadable or unsafe file
EXIT_FAILED = 1  # the command ran but a check it makes failed
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


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
    parser.add_argument("--num-classes", type=positive_int, metavar="N",
                        help="classifier size of MODEL (timm num_classes)")
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


def _flag(option: dataclasses.Field) -> str:
    """The command-line flag of an ``Options`` field: its ``flag`` metadata, ``--no-NAME`` for a
    flag that is on by default, else ``--NAME``."""
    if "flag" in option.metadata:
        return option.metadata["flag"]
    prefix = "--no-" if option.default is True else "--"
    return prefix + option.name.replace("_", "-")


def add_conversion_arguments(parser: argparse.ArgumentParser) -> None:
    """One option for each field of ``icrewrite.Options`` (see ``conversion_options``): ``--NAME``
    for a value or a flag that is off by default, ``--no-NAME`` for one that is on, and a
    repeatable flag for a tuple (read by the field's ``parse``, e.g. ``--p-override PATTERN=P``)."""
    group = parser.add_argument_group("conversion")
    for option in dataclasses.fields(Options):
        flag, help = _flag(option), option.metadata["help"]
        if isinstance(option.default, bool) and option.default:
            group.add_argument(flag, dest=option.name, action="store_false", help=f"do not {help}")
        elif isinstance(option.default, bool):
            group.add_argument(flag, dest=option.name, action="store_true", help=help)
        elif isinstance(option.default, tuple):
            parse = option.metadata.get("parse")
            group.add_argument(flag, dest=option.name, action="append", default=[],
                               type=_argument_type(parse) if parse else str,
                               metavar=option.metadata.get("metavar", "PATTERN"), help=f"{help} (repeatable)")
        else:
            group.add_argument(flag, dest=option.name, type=type(option.default), default=option.default,
                               choices=option.metadata["choices"], help=f"{help} (default {option.default})")


def _argument_type(parse: Any) -> Any:
    """``parse`` as an argparse type: its ``ICRewriteError`` becomes argparse's usage error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ICRewriteError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    convert.__name__ = parse.__name__
    return convert


def conversion_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``icrewrite.plan``/``icrewrite.convert`` from the parsed options."""
    return {option.name: getattr(args, option.name) for option in dataclasses.fields(Options)}


def given_conversion_flags(args: argparse.Namespace) -> list[str]:
    """The conversion flags whose values differ from the defaults (what the user asked to change)."""
    defaults, given = Options(), Options(**conversion_options(args))
    return [_flag(option) for option in dataclasses.fields(Options)
            if getattr(given, option.name) != getattr(defaults, option.name)]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one sub-parser per command module of this package."""
    parser = _Parser(
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


def at_least(minimum: int) -> Callable[[str], int]:
    """The argparse type of an integer count or size that must be at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


positive_int = at_least(1)  # every count and size on the command line that cannot be 0


def describe_error(err: BaseException) -> str:
    """One line for an expected failure: the message of an ``ICRewriteError``, the file and
    the reason of an ``OSError``, what could not be decoded of a ``UnicodeError``."""
    if isinstance(err, ICRewriteError):
        text = str(err)
    elif isinstance(err, OSError) and err.strerror:
        names = [shortened(str(n), 120) for n in (err.filename, err.filename2) if n is not None]
        text = f"{' -> '.join(names) + ': ' if names else ''}{err.strerror}"
    elif isinstance(err, UnicodeError):
        text = f"cannot decode the input as text ({err})"
    else:
        text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return " ".join(text.split())  # one line, whatever the message held


EXPECTED_ERRORS = (ICRewriteError, OSError, UnicodeError)  # bad input, unreadable or unwritable files, undecodable data


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 success, 1 a check failed, 2 an error).

    Expected failures (``EXPECTED_ERRORS``: an ``ICRewriteError``, an ``OSError`` on an input
    or output, undecodable data) print one ``error:`` line and return 2; anything else is a
    bug and keeps its traceback. ``--debug`` shows the traceback of every failure. ``--help``,
    ``--version`` and usage errors (one line) return argparse's exit code instead of raising."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else EXIT_ERROR
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            return args.func(args)
        except EXPECTED_ERRORS as err:
            if args.debug:
                traceback.print_exc()
            print(f"error: {describe_error(err)}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
