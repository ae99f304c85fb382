"""``icrewrite plan MODEL``: the edits a conversion would make, as a table; ``--json PATH``
also writes the plan, which ``icrewrite convert MODEL --plan PATH`` converts by."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .. import Plan, plan
from ..errors import ConversionError
from ..files import atomic_path, refuse_overwrite
from . import add_command, add_conversion_arguments, add_model_arguments, conversion_options, model_from_args

STDOUT = "-"  # --json without a path: the JSON goes to stdout instead of the table


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "plan",
        summary="show what a conversion would change",
        description="List every edit `icrewrite convert` would make to MODEL (IC blocks inserted, BatchNorms "
                    "folded) and every weight layer left as it was, with the reason. With --json PATH the plan is "
                    "also written as JSON, for `icrewrite convert MODEL --plan PATH`; --json alone prints the JSON "
                    "instead of the table.",
        example="icrewrite plan resnet50 --exclude 'layer4.*' --json resnet50.plan.json",
    )
    add_model_arguments(parser)
    add_conversion_arguments(parser)
    parser.add_argument("--json", nargs="?", const=STDOUT, metavar="PATH",
                        help="write the plan as JSON to PATH (without PATH: print it instead of the table)")
    parser.add_argument("--force", action="store_true", help="overwrite the --json file if it exists")
    parser.set_defaults(func=run)


def write_plan(the_plan: Plan, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write ``the_plan.to_dict()`` as JSON, atomically; an existing file only with ``force``."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(the_plan.to_dict(), indent=2) + "\n", encoding="utf-8")


def read_plan(path: str | os.PathLike) -> Plan:
    """The plan in a file ``write_plan`` wrote; a missing, unreadable or malformed one is a
    one-line ``ConversionError`` naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConversionError(f"{path}: cannot read the plan ({err.strerror or err})") from err
    except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than json reads
        raise ConversionError(f"{path}: not a JSON plan ({str(err)[:120]})") from err
    try:
        return Plan.from_dict(data)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err}") from err


def run(args: argparse.Namespace) -> int:
    to_file = args.json not in (None, STDOUT)
    if to_file:
        refuse_overwrite(args.json, force=args.force)  # before the model is built and traced, not after
    the_plan = plan(model_from_args(args), **conversion_options(args))
    if args.json == STDOUT:
        print(json.dumps(the_plan.to_dict(), indent=2))
        return 0
    print(the_plan)
    if to_file:
        write_plan(the_plan, args.json, force=args.force)
        print(f"wrote {args.json}")
    return 0
