"""Export one model per timm family to ONNX, original and IC-converted, and tabulate the results.

Each model is built with random weights (norms randomised), exported with
``icrewrite.export_onnx`` (verification on: ONNX checker, no Dropout, onnxruntime parity at
batch 1 and 4), converted with ``icrewrite.convert``, given random IC statistics and
exported again. Small inputs keep the run short. The markdown table is printed and, with
``--doc``, written between the ``onnx-families`` markers of that file.

    python benchmarks/onnx_families.py --doc docs/onnx.md
    python benchmarks/onnx_families.py --models resnet18 vit_tiny_patch16_224   # a subset
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import model_entrypoint
from torch import nn
from tqdm import tqdm

import icrewrite
from icrewrite.deploy.onnx import EXPORTERS, ExportReport, export_onnx
from icrewrite.files import atomic_path
from icrewrite.testing import randomize_norms

# (model, timm.create_model kwargs, input height = width): one or two per timm family, small inputs.
MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("resnet18", {}, 64),
    ("resnetv2_18", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("tf_efficientnet_b0", {}, 64),
    ("regnetx_002", {}, 64),
    ("densenet121", {}, 64),
    ("convnext_atto", {}, 64),
    ("ghostnet_050", {}, 64),
    ("rexnet_100", {}, 64),
    ("dla46_c", {}, 64),
    ("dpn48b", {}, 64),
    ("hrnet_w18_small", {}, 64),
    ("resnest14d", {}, 64),
    ("cspresnet50", {}, 64),
    ("repvgg_a0", {}, 64),
    ("nf_resnet26", {}, 64),
    ("poolformer_s12", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("inception_v3", {}, 96),
    ("legacy_xception", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("fastvit_t8", {}, 64),
    ("efficientvit_b0", {}, 64),
    ("hgnetv2_b0", {}, 64),
    ("ese_vovnet19b_slim_dw", {}, 64),
    ("starnet_s1", {}, 64),
    ("repghostnet_050", {}, 64),
    ("inception_next_atto", {}, 64),
    ("skresnet18", {}, 64),
    ("selecsls42b", {}, 64),
    ("res2net50_14w_8s", {}, 64),
    ("fasternet_t0", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32}, 32),
    ("deit_tiny_patch16_224", {"img_size": 32}, 32),
    ("swin_tiny_patch4_window7_224", {"img_size": 56}, 56),
    ("mixer_s16_224", {"img_size": 64}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    ("pit_ti_224", {"img_size": 64}, 64),
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64),
    ("convit_tiny", {"img_size": 64}, 64),
    ("cait_xxs24_224", {"img_size": 64}, 64),
    ("gcvit_xxtiny", {"img_size": 64}, 64),
    ("eva02_tiny_patch14_224", {"img_size": 56}, 56),
    ("coat_lite_tiny", {"img_size": 64}, 64),
    ("twins_svt_small", {"img_size": 64}, 64),
    ("pvt_v2_b0", {}, 64),
    ("davit_tiny", {}, 64),
    ("volo_d1_224", {"img_size": 64}, 64),
    ("visformer_tiny", {"img_size": 64}, 64),
    ("mambaout_femto", {}, 64),
    ("maxvit_nano_rw_256", {"img_size": 128}, 128),
]
BEGIN, END = "<!-- onnx-families:begin -->", "<!-- onnx-families:end -->"


@dataclass
class Row:
    family: str
    model: str
    size: int
    original: str  # exporter used, or the error
    converted: str
    folding: str = ""
    error_ratio: float | None = None  # worst onnxruntime error / tolerance of the IC export
    seconds: float = 0.0

    def markdown(self) -> str:
        ratio = f"{self.error_ratio:.1e}" if self.error_ratio is not None else ""
        return (f"| {self.family} | {self.model} | {self.size} | {self.original} | {self.converted} | {self.folding} "
                f"| {ratio} | {self.seconds:.0f} |")


HEADER = ("| family | model | input | original export | IC export | ICs folded / kept | worst error / tolerance "
          "| seconds |\n|---|---|---|---|---|---|---|---|")


def try_export(model: nn.Module, path: Path, size: int, exporters: tuple[str, ...]) -> ExportReport | str:
    """The export report, or the error message when the export fails."""
    try:
        return export_onnx(model, path, input_size=(3, size, size), exporters=exporters)
    except Exception as error:  # the table records every failure, of any kind
        return f"{type(error).__name__}: {error}".replace("|", "/")[:160]


@torch.no_grad()
def with_nonzero_output(model: nn.Module, size: int) -> nn.Module:
    """Re-initialise a zero-initialised classifier (MLP-Mixer's): a zero output makes parity vacuous."""
    if model(torch.randn(1, 3, size, size)).abs().max() == 0:
        model.reset_classifier(model.num_classes)
    return model


def run_model(name: str, kwargs: dict[str, Any], size: int, folder: Path, exporters: tuple[str, ...]) -> Row:
    start = time.perf_counter()
    family = model_entrypoint(name).__module__.rsplit(".", 1)[-1]
    original = randomize_norms(timm.create_model(name, pretrained=False, **kwargs), seed=0).eval()
    original = with_nonzero_output(original, size)
    original_report = try_export(original, folder / f"{name}.onnx", size, exporters)
    converted = randomize_norms(icrewrite.convert(original), seed=1)
    report = try_export(converted, folder / f"{name}-ic.onnx", size, exporters)
    row = Row(family, name, size,
              original=original_report.exporter if isinstance(original_report, ExportReport) else original_report,
              converted=report.exporter if isinstance(report, ExportReport) else report,
              seconds=time.perf_counter() - start)
    if isinstance(report, ExportReport):
        fold = report.fold
        row.folding = f"{len(fold.folded) + len(fold.border_corrected)} / {len(fold.kept)}"
        row.error_ratio = max(p.max_abs_error / p.tolerance for p in report.parity)
    return row


def write_table(doc: Path, table: str) -> None:
    """Replace the text between the markers of ``doc`` with ``table``."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with atomic_path(doc) as tmp:
        tmp.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="a subset of the built-in list")
    parser.add_argument("--exporter", choices=EXPORTERS, action="append", dest="exporters",
                        help="exporters to try, in order (default: export_onnx's, dynamo then torchscript)")
    parser.add_argument("--doc", type=Path, help="markdown file whose onnx-families section receives the table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = [m for m in MODELS if args.models is None or m[0] in args.models]
    exporters = tuple(args.exporters or EXPORTERS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx-families-") as folder:
        for name, kwargs, size in tqdm(models, desc="models"):
            rows.append(run_model(name, kwargs, size, Path(folder), exporters))
            tqdm.write(rows[-1].markdown())
    converted_ok = sum(isinstance(r.error_ratio, float) for r in rows)
    both = [r for r in rows if r.original in EXPORTERS]
    summary = (f"{len(rows)} models from {len({r.family for r in rows})} timm families: "
               f"{len(both)} originals exported, {converted_ok} IC models exported and verified "
               f"({sum(r.converted in EXPORTERS for r in both)} of the {len(both)} whose original exported).")
    table = "\n".join([summary, "", HEADER, *(r.markdown() for r in rows)])
    print(table)
    if args.doc:
        write_table(args.doc, table)


if __name__ == "__main__":
    main()
