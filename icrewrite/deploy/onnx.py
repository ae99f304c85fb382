"""Export a model (converted or not) to ONNX for deployment, verified in onnxruntime.

The model is exported in eval mode, so no Dropout reaches the graph, after folding each
IC into the weight layer it feeds where that is exact at any input size
(:func:`icrewrite.fold.fold_ic`). An IC before a zero-padded convolution stays one
per-channel affine op (BatchNormalization) unless ``border_correction=True``: the
correction is a constant map added after the convolution, which onnxruntime cannot fuse
and which measured slower on CPU than the affine op (docs/onnx.md).
Both torch exporters are tried, the ``torch.export``-based one (``dynamo=True``) first:
the first whose file passes the ONNX checker and matches the PyTorch eval output in
onnxruntime is written (atomically), and the report says which one and why the other
was not used.
"""
from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .. import compat, model_info
from ..errors import ExportError, require
from ..files import atomic_path, refuse_overwrite, scratch_folder
from ..rewrite import TOLERANCE, options_of, output_tensors
from . import EXPORTERS
from .fold import FoldReport, fold_ic

onnx = require("onnx", "onnx")
onnxruntime = require("onnxruntime", "onnx")

__all__ = ["export_onnx", "ExportReport", "Parity"]

Exporter = Literal["dynamo", "torchscript"]
INPUT_NAME = "input"
_EXAMPLE_BATCH = 2  # torch.export specialises a batch of 1, so the dynamic batch is traced at 2
_SEED = 0


@dataclass(frozen=True)
class Parity:
    """onnxruntime against PyTorch eval output at one batch size."""

    batch_size: int
    max_abs_error: float
    max_abs_output: float

    @property
    def tolerance(self) -> float:
        return TOLERANCE * self.max_abs_output

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance

    def __str__(self) -> str:
        return f"batch {self.batch_size}: max abs error {self.max_abs_error:.2e} (tolerance {self.tolerance:.2e})"


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it was checked.

    ``fold`` is None with ``fold=False``; ``parity`` is empty with ``verify=False``;
    ``rejected`` maps each exporter tried before the one used to the reason it failed;
    ``metadata`` is what the file's ``metadata_props`` hold.
    """

    path: Path
    exporter: Exporter
    opset: int
    input_size: tuple[int, ...]
    dynamic_batch: bool
    fold: FoldReport | None
    parity: list[Parity] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return bool(self.parity) and all(p.ok for p in self.parity)

    def __str__(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else "batch 1"
        size = "x".join(map(str, self.input_size))
        lines = [f"wrote {self.path} with the {self.exporter} exporter (opset {self.opset}), input {size}, {batch}"]
        lines.append(f"folding: {self.fold}" if self.fold else "folding: off")
        if self.parity:
            lines.append("verified: onnx checker (full), no Dropout, onnxruntime " + "; ".join(map(str, self.parity)))
        else:
            lines.append("not verified")
        lines += [f"{name} exporter not used: {why}" for name, why in self.rejected.items()]
        return "\n".join(lines)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: Sequence[int] | None = None,
    dynamic_batch: bool = True,
    opset: int | None = None,
    fold: bool = True,
    border_correction: bool = False,
    verify: bool = True,
    exporters: Sequence[Exporter] = EXPORTERS,
    force: bool = True,
) -> ExportReport:
    """Export ``model`` in eval mode to the ONNX file ``path`` and check the file.

    Args:
        model: any ``nn.Module`` taking one image batch; it is not modified.
        path: the ``.onnx`` file to write (atomically).
        input_size: ``(C, H, W)``; defaults to ``model.pretrained_cfg["input_size"]``.
        dynamic_batch: make the batch dimension dynamic (else the graph takes batch 1).
        opset: ONNX opset; None lets each exporter use its default.
        fold: fold ICs into the weight layers they feed (see :func:`icrewrite.fold.fold_ic`).
        border_correction: also fold ICs before zero-padded convolutions, adding a constant
            border map that is exact at ``input_size`` (the graph's size) only.
        verify: run ``onnx.checker`` (full check), look for Dropout nodes and compare
            onnxruntime with PyTorch on random inputs (batches 1 and 4 when dynamic).
        exporters: exporters to try, in order; the first that succeeds is used.
        force: replace an existing ``path``.

    Raises ExportError when no exporter produces a file that verifies.
    """
    path = refuse_overwrite(path, force=force, error=ExportError)
    input_size = _input_size(model, input_size)
    deployed = copy.deepcopy(model).cpu().eval()
    batches = (1, 4) if dynamic_batch else (1,)
    inputs = [_random_input(batch, input_size) for batch in batches]
    expected = [_run_torch(deployed, x) for x in inputs] if verify else []
    fold_size = input_size if border_correction else None
    fold_report = fold_ic(deployed, input_size=fold_size, inplace=True)[1] if fold else None
    metadata = _metadata(model, input_size, dynamic_batch, fold_report)
    example = _random_input(_EXAMPLE_BATCH if dynamic_batch else 1, input_size)
    rejected: dict[str, str] = {}
    with scratch_folder("export") as scratch:
        for exporter in exporters:
            exported = Path(scratch) / f"{exporter}.onnx"
            file_metadata = {**metadata, "icrewrite_exporter": exporter}
            try:
                proto = _export(exporter, deployed, example, exported, opset, dynamic_batch)
                _set_metadata(proto, file_metadata)
                onnx.save_model(proto, exported)
                parity = _verify(exported, inputs, expected) if verify else []
            except Exception as error:  # any exporter or verification failure: try the next exporter
                rejected[exporter] = _one_line(error)
                continue
            with atomic_path(path, force=force, error=ExportError) as tmp:
                onnx.save_model(proto, tmp)
            return ExportReport(
                path=path,
                exporter=exporter,
                opset=_opset(proto),
                input_size=input_size,
                dynamic_batch=dynamic_batch,
                fold=fold_report,
                parity=parity,
                rejected=rejected,
                metadata=file_metadata,
            )
    reasons = "; ".join(f"{name}: {why}" for name, why in rejected.items())
    raise ExportError(f"cannot export {model_info.architecture(model)} to ONNX ({reasons})")


def _input_size(model: nn.Module, given: Sequence[int] | None) -> tuple[int, ...]:
    """The export's input size; a model that records none must be told it (a wrong guess would
    export a graph for another size)."""
    size = model_info.input_size(model, given)
    if size is None:
        raise ExportError("the model has no pretrained_cfg['input_size']; pass the input size, e.g. 3 224 224")
    return size


def _random_input(batch: int, input_size: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(_SEED + batch))


@torch.no_grad()
def _run_torch(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    return [t.numpy() for t in output_tensors(model(x))]


def _metadata(
    model: nn.Module, input_size: tuple[int, ...], dynamic_batch: bool, fold_report: FoldReport | None
) -> dict[str, str]:
    """The ``metadata_props`` of the exported file: where the model came from and what was done to it."""
    from .. import __version__

    metadata = {
        "icrewrite_version": __version__,
        "input_size": json.dumps(list(input_size)),
        "dynamic_batch": json.dumps(dynamic_batch),
        "icrewrite_fold": json.dumps(fold_report.to_dict() if fold_report else None),
    }
    if name := model_info.timm_architecture(model):
        metadata["timm_model"] = name
    if (options := options_of(model)) is not None:
        metadata["icrewrite_options"] = json.dumps(options)
    if names := model_info.class_names(model):  # what the outputs mean
        metadata["label_names"] = json.dumps(names)
    return metadata


def _set_metadata(proto: onnx.ModelProto, metadata: dict[str, str]) -> None:
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})


def _export(
    exporter: Exporter,
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int | None,
    dynamic_batch: bool,
) -> onnx.ModelProto:
    """Run one torch exporter into ``path`` and load the result."""
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated and warns about traced Python values;
        # the onnxruntime comparison is what decides whether its graph is right.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _EXPORT[exporter](model, example, path, opset, dynamic_batch)
    return onnx.load(path)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool) -> None:
    require("onnxscript", "onnx")  # torch's dynamo exporter is built on it
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with compat.onnx_export_without_draft():  # torch 2.8 would take a draft of what torch.export refuses
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
        )
    program.save(path)


def _export_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool
) -> None:
    with torch.no_grad():
        num_outputs = len(output_tensors(model(example)))
    output_names = ["output"] if num_outputs == 1 else [f"output{i}" for i in range(num_outputs)]
    batch_axis = {0: "batch"}
    dynamic_axes = {name: batch_axis for name in (INPUT_NAME, *output_names)} if dynamic_batch else None
    torch.onnx.export(
        model,
        (example,),
        path,
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset_version=opset,
    )


_EXPORT: dict[Exporter, Callable[[nn.Module, torch.Tensor, Path, int | None, bool], None]] = {
    "dynamo": _export_dynamo,
    "torchscript": _export_torchscript,
}


def _verify(path: Path, inputs: list[torch.Tensor], expected: list[list[np.ndarray]]) -> list[Parity]:
    """Check the file, then compare onnxruntime with the PyTorch outputs ``expected``."""
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(path)
    if dropouts := [n.name for n in _nodes(proto) if n.op_type == "Dropout"]:
        raise ExportError(f"the graph has Dropout nodes: {', '.join(dropouts[:3])}")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parity = [_compare(session, x, reference) for x, reference in zip(inputs, expected)]
    if bad := [p for p in parity if not p.ok]:
        raise ExportError(f"onnxruntime output differs from PyTorch at {bad[0]}")
    return parity


def _nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Every node of the main graph, of its subgraphs (If, Loop, Scan) and of its local functions."""
    nodes: list[onnx.NodeProto] = [n for function in proto.functions for n in function.node]
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        nodes += graph.node
        graphs += [g for n in graph.node for a in n.attribute for g in _subgraphs(a)]
    return nodes


def _subgraphs(attribute: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        return [attribute.g]
    return list(attribute.graphs)


def _compare(session: onnxruntime.InferenceSession, x: torch.Tensor, expected: list[np.ndarray]) -> Parity:
    actual = session.run(None, {INPUT_NAME: x.numpy()})
    if len(actual) != len(expected):
        raise ExportError(f"the ONNX graph has {len(actual)} outputs, the model {len(expected)}")
    if shapes := [(a.shape, e.shape) for a, e in zip(actual, expected) if a.shape != e.shape]:
        raise ExportError(f"ONNX output shape {shapes[0][0]} differs from PyTorch's {shapes[0][1]}")
    errors = [np.abs(a.astype(np.float64) - e).max(initial=0.0) for a, e in zip(actual, expected)]
    scales = [np.abs(e).max(initial=0.0) for e in expected]
    return Parity(batch_size=x.shape[0], max_abs_error=float(max(errors)), max_abs_output=float(max(scales)))


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _one_line(error: BaseException) -> str:
    """The root cause of an exporter failure in one line (the outer torch.onnx errors only list next steps)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
