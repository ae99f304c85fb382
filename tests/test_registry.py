"""The registry: built-in recognition by class, and users' own weight layers and attention."""
from __future__ import annotations

import math

import pytest
import timm.layers
import torch
import torch.nn.functional as F
from torch import nn

import icrewrite
from icrewrite import ConversionError
from icrewrite.layers import ICWeightLayer
from icrewrite.registry import (is_activation_module, is_batchnorm, is_foldable_into, is_passthrough_module,
                                is_weight_layer, weight_layer_features)
from icrewrite.testing import check_conversion, randomize_norms


class ScaledConv(nn.Module):
    """A user's convolution: its own weight Parameter, applied with ``F.conv2d`` (no nn.Conv2d)."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels_out, channels_in, 3, 3) / math.sqrt(9 * channels_in))
        self.gain = nn.Parameter(torch.ones(channels_out, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.gain, padding=1)


class RegisteredScaledConv(ScaledConv):
    """The same layer, registered (below) with the features of its input."""


icrewrite.register_weight_layer(RegisteredScaledConv, features=lambda m: (m.weight.shape[1], 1))


def net(conv: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), conv(8, 8), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_an_unregistered_layer_that_applies_a_weight_is_named_with_how_to_register_it():
    plan = icrewrite.plan(net(ScaledConv))
    notes = {n.target: n.reason for n in plan.notes}
    assert "register_weight_layer(test_registry.ScaledConv)" in notes["3"]
    assert "conv2d" in notes["3"] and "no IC block" in notes["3"]
    assert "3" not in {e.target for e in plan.edits}
    assert "3 " in str(plan) and "keep" in str(plan)


def test_a_registered_layer_gets_its_ic_block_and_passes_every_check():
    model = randomize_norms(net(RegisteredScaledConv), seed=2).eval()
    plan = icrewrite.plan(model)
    assert [e.target for e in plan.edits if e.action == "insert-ic"] == ["3", "8"]
    assert not any("register_weight_layer" in n.reason for n in plan.notes)
    converted = icrewrite.convert(model)
    assert isinstance(converted[3], ICWeightLayer) and isinstance(converted[3], RegisteredScaledConv)
    assert converted[3].ic.num_features == 8
    result = check_conversion(model, torch.randn(16, 3, 12, 12))
    assert result.ok, result.failures
    assert result.sites == 2


class FusedQKVAttention(nn.Module):
    """A user's attention that uses its qkv layer's weight functionally (an IC block on qkv would not run)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_bias = nn.Parameter(torch.randn(3 * dim) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(F.linear(x, self.qkv.weight, self.qkv_bias))


class RoutedFusedQKVAttention(FusedQKVAttention):
    """The same function with ``qkv`` called as a module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x) + self.qkv_bias)


def find_route(attention: nn.Module, calls: object) -> icrewrite.Reroute | None:
    if type(attention) is not FusedQKVAttention:
        return None
    return icrewrite.Reroute(("qkv",), 0, "qkv called as a module", RoutedFusedQKVAttention)


class Tokens(nn.Module):
    def __init__(self, attention: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.attention = attention(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(self.norm(self.embed(x))).mean(1))


def test_an_unregistered_attention_leaves_its_functional_weight_as_a_note():
    class Unrouted(FusedQKVAttention):
        pass

    plan = icrewrite.plan(Tokens(Unrouted))
    notes = {n.target: n.reason for n in plan.notes}
    assert "used functionally" in notes["attention.qkv"]


def test_a_reroute_to_a_class_its_registration_does_not_declare_is_refused():
    class Undeclared(FusedQKVAttention):
        pass

    class RoutedUndeclared(Undeclared, RoutedFusedQKVAttention):
        pass

    def find(attention: nn.Module, calls: object) -> icrewrite.Reroute:
        return icrewrite.Reroute(("qkv",), 0, "qkv called as a module", RoutedUndeclared)

    icrewrite.register_reroute(Undeclared, find, reason="test attention")  # routes_to not given
    with pytest.raises(ConversionError, match=r"declare it: icrewrite.register_reroute\(Undeclared, find, "
                                              r"routes_to=\[RoutedUndeclared\]\)"):
        icrewrite.plan(Tokens(Undeclared))


def test_a_registered_reroute_makes_the_attention_an_ic_site():
    icrewrite.register_reroute(FusedQKVAttention, find_route, routes_to=[RoutedFusedQKVAttention],
                               reason="test attention")
    model = Tokens(FusedQKVAttention).eval()
    plan = icrewrite.plan(model)
    assert [e.target for e in plan.edits if e.action == "route-through-module"] == ["attention"]
    assert "attention.qkv" in {e.target for e in plan.edits if e.action == "insert-ic"}
    converted = icrewrite.convert(model)
    assert type(converted.attention) is RoutedFusedQKVAttention
    result = check_conversion(model, torch.randn(8, 5, 6))
    assert result.ok, result.failures


@pytest.mark.parametrize("register", [icrewrite.register_weight_layer, icrewrite.register_norm,
                                      icrewrite.register_activation, icrewrite.register_passthrough])
def test_registering_something_that_is_not_a_module_class_is_refused(register):
    with pytest.raises(ConversionError, match="nn.Module subclass"):
        register(F.relu)


def test_the_built_in_layers_are_registered_by_class():
    std = timm.layers.StdConv2d(4, 4, 3)
    assert is_weight_layer(nn.Conv2d(2, 3, 1)) and is_weight_layer(std) and is_weight_layer(nn.Linear(2, 3))
    assert weight_layer_features(nn.Linear(5, 3)) == (5, -1) and weight_layer_features(std) == (4, 1)
    assert is_foldable_into(nn.Conv2d(2, 3, 1)) and not is_foldable_into(std)  # StdConv2d standardises its weight
    assert is_batchnorm(nn.BatchNorm2d(3)) and is_batchnorm(timm.layers.BatchNormAct2d(3))
    assert not is_batchnorm(nn.LayerNorm(3))
    assert is_activation_module(nn.ReLU()) and is_activation_module(timm.layers.GELU())
    assert not is_activation_module(nn.Softmax(dim=1))
    assert is_passthrough_module(nn.Dropout()) and is_passthrough_module(timm.layers.DropPath(0.1))


# --- weight layers registered without features: the analysis reads them off the weight op's input ---------------


class PaddedConv(nn.Module):
    """A user's convolution with only ``weight`` and ``bias``: pads, then ``F.conv2d``."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels_out, channels_in, 3, 3) / math.sqrt(9 * channels_in))
        self.bias = nn.Parameter(torch.randn(channels_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.weight, self.bias)


class PlainLinear(nn.Module):
    """A user's linear map with only ``weight`` and ``bias``, applied with ``F.linear``."""

    def __init__(self, features_in: int, features_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features_out, features_in) / math.sqrt(features_in))
        self.bias = nn.Parameter(torch.randn(features_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class FlatteningLinear(PlainLinear):
    """Flattens its input first: the linear call reads features its input does not have at any one dim."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.weight, self.bias)


for _cls in (PaddedConv, PlainLinear, FlatteningLinear):
    icrewrite.register_weight_layer(_cls, reason="test: features read by the analysis")


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), PaddedConv(8, 6),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), PlainLinear(6, 4))


def linear_net() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), PlainLinear(12, 7), nn.BatchNorm1d(7),
                          nn.GELU(), PlainLinear(7, 3))
    model.pretrained_cfg = {"input_size": (5,)}  # what the meta probe feeds the model
    return model


class TokenMixer(nn.Module):
    """Tokens ``(N, T, C)``: the linear layers read the last dim of a 3-d input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 10)
        self.mix = PlainLinear(10, 8)
        self.head = PlainLinear(8, 3)
        self.pretrained_cfg = {"input_size": (4, 6)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.mix(F.gelu(self.embed(x)))).mean(1))


@pytest.mark.parametrize("make, x, expected", [
    (conv_net, torch.randn(16, 3, 10, 10), {"3": (8, 1), "8": (6, -1)}),
    (linear_net, torch.randn(32, 5), {"3": (12, -1), "6": (7, -1)}),
    (TokenMixer, torch.randn(8, 4, 6), {"mix": (10, -1), "head": (8, -1)}),
], ids=["conv", "linear", "tokens"])
def test_a_layer_registered_without_features_gets_them_from_its_weight_ops_input(make, x, expected):
    model = randomize_norms(make(), seed=3).eval()
    edits = {e.target: (e.features, e.feature_dim) for e in icrewrite.plan(model).edits if e.action == "insert-ic"}
    assert {name: edits.get(name) for name in expected} == expected
    converted = icrewrite.convert(model)
    for name, (features, feature_dim) in expected.items():
        ic = converted.get_submodule(name).ic
        assert (ic.num_features, ic.feature_dim) == (features, feature_dim)
        assert weight_layer_features(converted.get_submodule(name)) == (features, feature_dim)  # from its IC block
    result = check_conversion(make(), x, seed=5)  # eval function with randomised norms, placement, backward
    assert result.ok, result.failures
    assert result.sites >= len(expected)


class Unused(nn.Module):
    """Holds a weight layer that its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.spare = PaddedConv(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ReadsValues(nn.Module):
    """Control flow on a tensor value: it does not run on ``meta`` tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = PaddedConv(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if float(x.abs().max()) < 1e6 else x


class Flattens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = FlatteningLinear(4 * 2 * 2, 5)
        self.pretrained_cfg = {"input_size": (3, 4, 4)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


@pytest.mark.parametrize("make, name, why", [
    (Unused, "spare", "its forward never ran"),
    (ReadsValues, "conv", "does not run on a meta input"),
    (Flattens, "fc", "no conv/linear call in its forward reads its input's features"),
], ids=["never-called", "not-meta-runnable", "reshaped"])
def test_a_layer_whose_input_features_cannot_be_read_is_a_note_naming_features(make, name, why):
    model = make().eval()
    the_plan = icrewrite.plan(model)
    notes = {n.target: n.reason for n in the_plan.notes}
    cls = type(model.get_submodule(name))
    assert why in notes[name] and "\n" not in notes[name]
    assert f"register_weight_layer(test_registry.{cls.__qualname__}, features=lambda m:" in notes[name]
    assert name not in {e.target for e in the_plan.edits}
    converted = icrewrite.convert(model)  # the rest converts; that layer keeps its class
    assert type(converted.get_submodule(name)) is cls


def test_the_features_override_still_wins_and_only_the_analysis_reads_unknown_ones():
    class Overridden(PaddedConv):
        pass

    icrewrite.register_weight_layer(Overridden, features=lambda m: (m.weight.shape[1], 1))
    assert weight_layer_features(Overridden(5, 2)) == (5, 1)
    with pytest.raises(ConversionError, match=r"register_weight_layer\(.*PaddedConv, features=lambda m") as err:
        weight_layer_features(PaddedConv(5, 2))
    assert "\n" not in str(err.value)
