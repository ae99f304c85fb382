"""The paper's residual-unit layouts on timm ResNet BasicBlock and Bottleneck units."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import icrewrite
from icrewrite.layers import ICWeightLayer
from icrewrite.rewrite import residual_units
from icrewrite.testing import randomize_norms
from icrewrite.rewrite import trace_scopes


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def resnet(request):
    # timm zero-initialises each unit's last BatchNorm: randomise it so that branches count
    return request.param, randomize_norms(timm.create_model(request.param, pretrained=False)).eval()


def _unit_io(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of the first residual unit (identity shortcut in resnet18, not in resnet50)."""
    seen = {}
    unit = model.layer1[1]  # identity shortcut in both
    handle = unit.register_forward_hook(lambda m, a, out: seen.update(x=a[0].clone(), y=out.clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"], seen["y"]


def test_residual_units_are_found(resnet):
    name, model = resnet
    units = residual_units(trace_scopes(model)[0])
    last = "act2" if name == "resnet18" else "act3"
    assert len(units) == (8 if name == "resnet18" else 16)
    assert units[0].act == f"layer1.0.{last}" and units[0].branch_end == f"layer1.0.bn{last[-1]}"
    assert set(units[0].entry_layers) == {"layer1.0.conv1", "layer1.0.downsample.0"} - (
        {"layer1.0.downsample.0"} if name == "resnet18" else set())


def test_relu_ic_conv_keeps_relu_after_the_add(resnet):
    _, model = resnet
    x, y = _unit_io(icrewrite.convert(model), torch.randn(2, 3, 32, 32))
    assert (y >= 0).all() and (y - x < 0).any()  # relu(x + branch): the branch can pull the sum down


def test_ic_conv_relu_moves_the_relu_into_the_branch(resnet):
    name, model = resnet
    converted = icrewrite.convert(model, layout="ic-conv-relu", init="fresh").eval()
    unit = converted.layer1[1]
    last = "act2" if name == "resnet18" else "act3"
    assert isinstance(getattr(unit, last), nn.Identity)
    x, y = _unit_io(converted, torch.randn(2, 3, 32, 32))
    assert (y - x >= 0).all()  # x + relu(branch): the branch only adds
    assert isinstance(unit.conv1, ICWeightLayer)


def test_conv_relu_ic_ends_each_branch_with_an_ic_block(resnet):
    name, model = resnet
    converted = icrewrite.convert(model, layout="conv-relu-ic", init="fresh", p=0.0).train()
    unit = converted.layer1[1]
    end = unit.bn2 if name == "resnet18" else unit.bn3
    assert list(end._modules) == ["norm", "act", "ic"]
    assert not isinstance(unit.conv1, ICWeightLayer)  # entry layers read the unit input directly
    branch = {}
    handle = end.register_forward_hook(lambda m, a, out: branch.update(out=out.clone()))  # timm adds in place
    converted(torch.randn(8, 3, 32, 32))
    handle.remove()
    flat = branch["out"].transpose(0, 1).reshape(branch["out"].shape[1], -1)
    alive = flat.var(1) > 1e-6
    torch.testing.assert_close(flat.mean(1)[alive], torch.zeros(int(alive.sum())), atol=1e-4, rtol=0)


def test_layouts_train_and_convert_once(resnet):
    name, _ = resnet
    model = timm.create_model(name, pretrained=False)  # timm's own init: zero gamma in each unit's last norm
    for layout in ("ic-conv-relu", "conv-relu-ic"):
        converted = icrewrite.convert(model, layout=layout, init="fresh").train()
        converted(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in converted.parameters())
        ends = [m.norm for m in converted.modules() if isinstance(m, nn.Sequential) and "norm" in m._modules]
        assert ends and all(end.weight.grad.abs().sum() > 0 for end in ends)  # the branches learn
        assert not icrewrite.plan(converted, layout=layout, init="fresh").edits


def test_layout_needs_residual_units():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(icrewrite.ConversionError, match="has none"):
        icrewrite.convert(model, layout="ic-conv-relu", init="fresh")
