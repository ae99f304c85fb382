"""Deploy-time folding of IC blocks (icrewrite.deploy.fold) and verified ONNX export (icrewrite.deploy.onnx)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
from timm.layers import StdConv2d
from torch import nn

import icrewrite
from icrewrite.cli import export as export_command
from icrewrite.errors import ExportError
from icrewrite.deploy.onnx import export_onnx
from icrewrite.deploy import fold_ic
from icrewrite.layers import BorderCorrectedConv1d, BorderCorrectedConv2d, BorderCorrectedConv3d
from icrewrite.layers import IC, ICWeightLayer, attach_ic
from icrewrite.registry import weight_layer_features
from icrewrite.testing import randomize_norms

FAST = ("torchscript",)  # the dynamo exporter takes tens of seconds per timm model on a busy 2-core machine


def with_ic(layer: nn.Module, p: float = 0.05) -> nn.Module:
    num_features, feature_dim = weight_layer_features(layer)
    return attach_ic(layer, IC(num_features, p, feature_dim=feature_dim))


def random_ic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval mode, every norm (IC ones too) far from identity so that a wrong fold shows."""
    return randomize_norms(model, seed).eval()


def converted(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A timm model converted by icrewrite, with random original and IC statistics."""
    original = randomize_norms(timm.create_model(name, pretrained=False, **kwargs), seed)
    return random_ic(icrewrite.convert(original), seed + 1)


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return (actual - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def onnx_nodes(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(path).graph.node]


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# --- folding -------------------------------------------------------------------------

CONVS = {
    "1x1": dict(kernel_size=1),
    "3x3 unpadded strided": dict(kernel_size=3, stride=2),
    "3x3 padded": dict(kernel_size=3, padding=1),
    "3x3 padded strided, no bias": dict(kernel_size=3, stride=2, padding=1, bias=False),
    "5x5 dilated": dict(kernel_size=5, padding=4, dilation=2),
    "same, even kernel": dict(kernel_size=4, padding="same"),
    "grouped": dict(kernel_size=3, padding=1, groups=4),
    "depthwise": dict(kernel_size=3, padding=1, groups=8),
    "reflect padding": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "asymmetric padding": dict(kernel_size=(1, 3), padding=(0, 2)),
}


@pytest.mark.parametrize("options", CONVS.values(), ids=CONVS.keys())
def test_folded_convolution_computes_the_ic_convolution(options):
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(8, 8, **options))))
    x = torch.randn(3, 8, 11, 13)
    folded, report = fold_ic(model, input_size=x.shape[1:])
    assert report.total == 1 and not report.kept
    assert not any(isinstance(m, ICWeightLayer) for m in folded.modules())
    assert close(folded(x), model(x))


@pytest.mark.parametrize("name", ["3x3 padded", "depthwise", "same, even kernel"])
def test_zero_padded_convolution_gets_a_border_correction_that_is_zero_inside(name):
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(8, 8, **CONVS[name]))))
    folded, report = fold_ic(model, input_size=(8, 11, 13))
    assert report.border_corrected == ["0"]
    conv = folded[0]
    assert type(conv) is BorderCorrectedConv2d
    inside = conv.border[:, 2:-2, 2:-2]
    assert inside.abs().max() <= 1e-6 * conv.border.abs().max()


@pytest.mark.parametrize("name", ["1x1", "3x3 unpadded strided", "reflect padding"])
def test_unpadded_convolution_folds_into_its_base_class(name):
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(8, 8, **CONVS[name]))))
    folded, report = fold_ic(model)
    assert report.folded == ["0"]
    assert type(folded[0]) is nn.Conv2d
    x = torch.randn(2, 8, 9, 9)  # any size: no input size was given
    assert close(folded(x), model(x))


def test_without_input_size_padded_convolutions_keep_their_ic():
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(4, 8, 3, padding=1)), with_ic(nn.Conv2d(8, 8, 1))))
    folded, report = fold_ic(model)
    assert report.folded == ["1"] and list(report.kept) == ["0"]
    assert "input size" in report.kept["0"]
    assert isinstance(folded[0], ICWeightLayer)
    x = torch.randn(2, 4, 7, 7)
    assert close(folded(x), model(x))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_tokens_folds(bias):
    model = random_ic(nn.Sequential(with_ic(nn.Linear(6, 5, bias=bias)), nn.GELU(), with_ic(nn.Linear(5, 3))))
    x = torch.randn(2, 7, 6)  # (B, N, C) tokens
    folded, report = fold_ic(model)
    assert report.folded == ["0", "2"]
    assert [type(m) for m in folded] == [nn.Linear, nn.GELU, nn.Linear]
    assert close(folded(x), model(x))


@pytest.mark.parametrize(
    ("conv", "size", "border_class"),
    [(nn.Conv1d(4, 6, 3, padding=1), (4, 10), BorderCorrectedConv1d),
     (nn.Conv3d(4, 6, 3, padding=1, groups=2), (4, 5, 6, 7), BorderCorrectedConv3d)],
)
def test_padded_1d_and_3d_convolutions_fold(conv, size, border_class):
    model = random_ic(nn.Sequential(with_ic(conv)))
    x = torch.randn(2, *size)
    folded, _ = fold_ic(model, input_size=size)
    assert type(folded[0]) is border_class
    assert close(folded(x), model(x))


def test_custom_and_shared_layers_keep_their_ic():
    shared = nn.Linear(4, 4)
    model = random_ic(nn.Sequential(with_ic(StdConv2d(4, 4, 1)), nn.Flatten(), with_ic(shared)))
    model.tied = nn.Linear(4, 4)
    model.tied.weight = shared.weight
    folded, report = fold_ic(model, input_size=(4, 1, 1))
    assert report.kept["0"].startswith("StdConv2d is not a plain")
    assert report.kept["2"] == "weight shared with another layer"
    x = torch.randn(2, 4, 1, 1)
    assert close(folded(x), model(x))


def test_fold_leaves_the_given_model_alone():
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(4, 4, 3, padding=1))))
    x = torch.randn(1, 4, 6, 6)
    expected = model(x)
    fold_ic(model, input_size=(4, 6, 6))
    assert isinstance(model[0], ICWeightLayer)
    assert torch.equal(model(x), expected)


def test_folding_a_converted_network_preserves_its_function():
    model = converted("resnet18")
    x = torch.randn(2, 3, 32, 32)
    folded, report = fold_ic(model, input_size=(3, 32, 32))
    assert report.total == sum(isinstance(m, ICWeightLayer) for m in model.modules())
    assert not report.kept and report.border_corrected and report.folded
    assert type(folded) is type(model)
    assert close(folded(x), model(x))


# --- export --------------------------------------------------------------------------

TIMM_MODELS = {
    "resnet18": ({}, 32),  # CNN with BatchNorm
    "mobilenetv3_small_050": ({}, 64),  # depthwise convolutions, squeeze-excitation, hard-swish
    "vit_tiny_patch16_224": ({"img_size": 32}, 32),  # Linear on (B, N, C) tokens, attention
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_converted_timm_model_exports_and_matches_onnxruntime(name, tmp_path):
    kwargs, size = TIMM_MODELS[name]
    model = converted(name, **kwargs)
    path = tmp_path / "model.onnx"
    report = export_onnx(model, path, input_size=(3, size, size), exporters=FAST)
    assert report.verified and [p.batch_size for p in report.parity] == [1, 4]
    assert report.fold.total > 0 and not any("plain" in why for why in report.fold.kept.values())
    onnx.checker.check_model(str(path), full_check=True)
    assert "Dropout" not in onnx_nodes(path)
    x = torch.randn(3, 3, size, size)  # a batch size the export did not check
    expected = model(x).detach().numpy()
    assert np.abs(run_onnx(path, x) - expected).max() <= 1e-4 * np.abs(expected).max()


def small_ic_net() -> nn.Module:
    """Padded and 1x1 convolutions and a Linear, all with ICs, carrying timm and icrewrite attributes."""
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(3, 4, 3, padding=1)), nn.ReLU(), with_ic(nn.Conv2d(4, 4, 1)),
                                    nn.Flatten(1), with_ic(nn.Linear(4 * 8 * 8, 5))))
    model.pretrained_cfg = {"architecture": "small_ic_net", "input_size": (3, 8, 8)}
    model.icrewrite_options = {"p": 0.05, "exclude": ["stem"]}
    return model


def test_default_export_uses_dynamo_a_dynamic_batch_and_the_model_input_size(tmp_path):
    report = export_onnx(small_ic_net(), tmp_path / "m.onnx")
    assert report.exporter == "dynamo" and report.rejected == {}
    assert report.input_size == (3, 8, 8) and [p.batch_size for p in report.parity] == [1, 4]
    batch = onnx.load(tmp_path / "m.onnx").graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value


def test_metadata_records_model_version_options_and_folding(tmp_path):
    model = small_ic_net()
    path = tmp_path / "m.onnx"
    report = export_onnx(model, path, exporters=FAST)
    metadata = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert metadata["timm_model"] == "small_ic_net"
    assert metadata["icrewrite_version"] == icrewrite.__version__
    assert json.loads(metadata["icrewrite_options"]) == model.icrewrite_options
    assert metadata["icrewrite_exporter"] == report.exporter == "torchscript"
    assert json.loads(metadata["icrewrite_fold"]) == report.fold.to_dict()
    assert report.fold.folded == ["2", "4"] and list(report.fold.kept) == ["0"]


def test_static_batch(tmp_path):
    report = export_onnx(small_ic_net(), tmp_path / "m.onnx", dynamic_batch=False, exporters=FAST)
    assert [p.batch_size for p in report.parity] == [1]
    dims = onnx.load(tmp_path / "m.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 8, 8]


@pytest.mark.parametrize(("options", "batch_norms"),
                         [({}, 1), ({"border_correction": True}, 0), ({"fold": False}, 3)])
def test_folding_leaves_only_the_ics_of_padded_convolutions_in_the_graph(options, batch_norms, tmp_path):
    report = export_onnx(small_ic_net(), tmp_path / "m.onnx", exporters=FAST, **options)
    assert report.verified
    assert onnx_nodes(tmp_path / "m.onnx").count("BatchNormalization") == batch_norms


def test_a_model_in_train_mode_exports_its_eval_function_without_dropout(tmp_path):
    model = random_ic(nn.Sequential(with_ic(nn.Conv2d(3, 4, 3), p=0.5), nn.Flatten(1),
                                    with_ic(nn.Linear(64, 5), p=0.5)))
    model.train()
    export_onnx(model, tmp_path / "m.onnx", input_size=(3, 6, 6), exporters=FAST, fold=False)
    assert model.training
    assert "Dropout" not in onnx_nodes(tmp_path / "m.onnx")
    x = torch.randn(2, 3, 6, 6)
    assert np.allclose(run_onnx(tmp_path / "m.onnx", x), model.eval()(x).detach().numpy(), atol=1e-5)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, tracing keeps the branch taken."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = with_ic(nn.Linear(4, 3))

    def forward(self, x):
        y = self.fc(x)
        return y if y.abs().max() >= 0 else -y


class Eigenvalues(nn.Module):
    """Complex eigenvalues: neither exporter has an ONNX translation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.linalg.eigvals(self.fc(x)).real


def test_falls_back_to_torchscript_when_dynamo_fails(tmp_path):
    report = export_onnx(random_ic(DataDependent()), tmp_path / "m.onnx", input_size=(4,))
    assert report.exporter == "torchscript" and report.verified
    assert "data-dependent" in report.rejected["dynamo"]


def test_a_model_no_exporter_handles_is_a_clear_error(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="cannot export Eigenvalues to ONNX") as error:
        export_onnx(Eigenvalues(), path, input_size=(4, 4))
    assert "dynamo:" in str(error.value) and "torchscript:" in str(error.value) and "eig" in str(error.value)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_input_size_is_needed_without_pretrained_cfg(tmp_path):
    with pytest.raises(ExportError, match="input size"):
        export_onnx(nn.Linear(3, 3), tmp_path / "m.onnx")


def test_existing_file_is_kept_unless_forced(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_text("keep")
    with pytest.raises(ExportError, match="exists"):
        export_onnx(nn.Linear(3, 3), path, input_size=(3,), force=False)
    assert path.read_text() == "keep"


def parse_export_command(argv: list[str]) -> argparse.Namespace:
    """Parse ``icrewrite export ...`` with only this command registered (the others import a lot)."""
    parser = argparse.ArgumentParser()
    export_command.register(parser.add_subparsers())
    return parser.parse_args(["export", *argv])


def test_cli_exports_a_saved_converted_model(tmp_path, capsys):
    checkpoint = tmp_path / "resnet10t_ic.safetensors"
    icrewrite.save(converted("resnet10t"), checkpoint)
    output = tmp_path / "resnet10t_ic.onnx"
    args = parse_export_command([str(checkpoint), "-o", str(output), "--input-size", "3", "32", "32",
                                 "--exporter", "torchscript", "--static-batch"])
    assert args.func(args) == 0
    assert "torchscript exporter" in capsys.readouterr().out
    proto = onnx.load(output)
    assert {p.key for p in proto.metadata_props} >= {"timm_model", "icrewrite_options"}
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    with pytest.raises(ExportError, match="exists"):
        args.func(args)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_onnx_file_gets_the_umask_permissions_and_no_scratch_is_left(tmp_path, monkeypatch, umask):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch_root))
    previous = os.umask(umask)
    try:
        export_onnx(with_ic(nn.Linear(3, 3)), tmp_path / "m.onnx", input_size=(3,), exporters=("torchscript",))
    finally:
        os.umask(previous)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o666 & ~umask
    assert list(scratch_root.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "tmp"]


def test_a_folder_is_not_replaced_by_the_onnx_file(tmp_path):
    (tmp_path / "m.onnx").mkdir()
    with pytest.raises(ExportError, match="m.onnx is a folder; a file is written there"):
        export_onnx(nn.Linear(3, 3), tmp_path / "m.onnx", input_size=(3,), force=True)
