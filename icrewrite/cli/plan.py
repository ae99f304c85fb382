"""``icrewrite plan MODEL``: the edits a conversion would make, as a table; nothing is written."""
from __future__ import annotations

import argparse
import json
from typing import Any

from .. import plan
from . import add_command, add_conversion_arguments, add_model_arguments, conversion_options, model_from_args


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "plan",
        summary="show what a conversion would change",
        description="List every edit `icrewrite convert` would make to MODEL (IC blocks inserted, BatchNorms "
                    "folded) and every weight layer left as it was, with the reason. Nothing is written.",
        example="icrewrite plan resnet50 --exclude 'layer4.*'",
    )
    add_model_arguments(parser)
    add_conversion_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    the_plan = plan(model_from_args(args), **conversion_options(args))
    print(json.dumps(the_plan.to_dict(), indent=2) if args.json else the_plan)
    return 0
