"""``icrewrite export MODEL -o model.onnx``: write a verified ONNX file for deployment."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..deploy import EXPORTERS
from ..errors import ExportError
from ..files import refuse_overwrite
from . import add_command, add_model_arguments, model_from_args, positive_int, progress


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers, "export",
        summary="export a model to ONNX, verified in onnxruntime",
        description="Export MODEL in eval mode to an ONNX file: IC blocks are folded into the weight layers they "
                    "feed where that is exact, the file passes the ONNX checker and onnxruntime reproduces the "
                    "PyTorch output on random inputs (batch 1 and 4). The dynamo exporter is tried first, the "
                    "TorchScript one if it fails; the report says which was used and what was folded.",
        example="icrewrite export resnet50_ic -o resnet50_ic.onnx --input-size 3 224 224",
    )
    add_model_arguments(parser)
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the .onnx file to write")
    parser.add_argument("--input-size", type=positive_int, nargs=3, metavar=("C", "H", "W"),
                        help="input image size (default: the model's pretrained_cfg input_size)")
    parser.add_argument("--opset", type=positive_int, metavar="N", help="ONNX opset (default: the exporter's)")
    parser.add_argument("--exporter", choices=EXPORTERS, action="append", dest="exporters",
                        help="use only this exporter (repeat to give an order; default: dynamo, then torchscript)")
    parser.add_argument("--no-fold", dest="fold", action="store_false",
                        help="keep every IC block as a separate op instead of folding it into its weight layer")
    parser.add_argument("--border-correction", action="store_true",
                        help="also fold ICs before zero-padded convolutions, adding a constant border map "
                             "(exact at the export size; slower than the affine op in onnxruntime on CPU)")
    parser.add_argument("--static-batch", dest="dynamic_batch", action="store_false",
                        help="fix the batch size to 1 (default: dynamic batch)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX checker and the onnxruntime comparison")
    parser.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy.onnx import export_onnx  # onnx and onnxruntime: only when exporting

    refuse_overwrite(args.output, force=args.force, error=ExportError)  # before loading and exporting, not after
    model = model_from_args(args)
    progress(f"exporting to {args.output}")
    report = export_onnx(
        model,
        args.output,
        input_size=args.input_size,
        dynamic_batch=args.dynamic_batch,
        opset=args.opset,
        fold=args.fold,
        border_correction=args.border_correction,
        verify=args.verify,
        exporters=args.exporters or EXPORTERS,
        force=args.force,
    )
    print(report)
    return 0
