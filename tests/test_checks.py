"""``check_conversion`` itself: it passes sound conversions whatever their statistics, and fails broken ones.

The broken conversions come from wrapping ``convert`` so that it damages one IC site after
converting correctly. The eval-mode function stays preserved (the IC block is the identity
there) and, but for ``removed``, the layer still looks converted (an ``IC<Base>`` class with
an ``ic`` child): only the train-mode placement check can see the damage.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from icrewrite.layers import ICBatchNorm, ic_base
from icrewrite.testing import check_conversion
from icrewrite.rewrite import TOLERANCE

from nets import PATTERNS

checks_module = importlib.import_module("icrewrite.testing")  # where check_conversion finds `convert`
edits_module = importlib.import_module("icrewrite.rewrite._edits")  # where the fold-norm edit finds `fold_bn_into`


class RunningStatsNorm(ICBatchNorm):
    """Normalises with its running statistics in train mode too: a per-feature affine map, no BatchNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def no_batchnorm(layer: nn.Module) -> None:
    layer.ic.norm.__class__ = RunningStatsNorm


def no_dropout(layer: nn.Module) -> None:
    layer.ic.drop = nn.Identity()


def bypassed(layer: nn.Module) -> None:
    """The IC block runs, but the weight is applied to the layer's input."""
    base = ic_base(type(layer))

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.ic(x)
        return base.forward(self, x)

    layer.__class__ = type("Bypassed", (type(layer),), {"forward": forward})


def never_runs(layer: nn.Module) -> None:
    """Still an ``IC<Base>`` with its ``ic`` child, but the forward skips it."""
    base = ic_base(type(layer))
    layer.__class__ = type("Skipping", (type(layer),), {"forward": lambda self, x: base.forward(self, x)})


def removed(layer: nn.Module) -> None:
    del layer.ic
    layer.__class__ = ic_base(type(layer))


def damage(monkeypatch: pytest.MonkeyPatch, target: str, fault: Callable[[nn.Module], None]) -> dict[str, torch.Tensor]:
    """Make ``convert`` damage the IC site ``target``; returns where the damaged block's inputs will be recorded
    (``"train"`` and ``"eval"``: the last input in each mode)."""
    convert, seen = checks_module.convert, {}

    def damaging_convert(model: nn.Module, **options) -> nn.Module:
        converted = convert(model, **options)
        layer = converted.get_submodule(target)
        layer.ic.register_forward_pre_hook(
            lambda ic, args: seen.__setitem__("train" if ic.training else "eval", args[0].detach()))
        fault(layer)
        return converted

    monkeypatch.setattr(checks_module, "convert", damaging_convert)
    return seen


FAULTS = {
    no_batchnorm: "IC output is not BatchNorm of its input",
    no_dropout: "no Dropout",
    bypassed: "weight applied to a (8, 8, 16, 16) tensor that is not its IC block's output",
    never_runs: "its IC block never ran",
    removed: "no IC block after convert",
}


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.__name__)
def test_a_damaged_ic_site_fails_and_only_that_site(monkeypatch, fault):
    damage(monkeypatch, "grouped.0", fault)
    result = check_conversion(PATTERNS["squeeze_excite"](), torch.randn(8, 3, 16, 16))
    assert any(f.startswith("grouped.0: ") and FAULTS[fault] in f for f in result.failures), result.failures
    assert not [f for f in result.failures if f.split(":")[0] in {"dw.0", "se_reduce", "se_expand", "fc"}]
    assert not [f for f in result.failures if f.startswith("eval output changed")]


def ghostnet() -> nn.Module:
    return timm.create_model("ghostnet_050", pretrained=False)


def test_se_gate_with_dead_channels_passes_and_fails_without_its_batchnorm(monkeypatch):
    """The old statistical rule ("most features alive") failed this SE gate: its input is
    4 pooled samples per feature, many constant over the batch. The element-wise check
    passes it, and still fails it when the IC block does not normalise."""
    x = torch.randn(4, 3, 32, 32)
    assert check_conversion(ghostnet(), x).ok

    seen = damage(monkeypatch, "blocks.3.0.se.conv_expand", no_batchnorm)
    result = check_conversion(ghostnet(), x)
    pooled = seen["eval"]  # (samples, features, 1, 1); in training, the masks upstream decide which are constant
    constant = pooled.flatten(1).T.var(1) == 0  # (features, samples): features constant over the batch
    assert pooled.shape[0] == 4 and constant.any()
    assert len(result.failures) == 1, result.failures
    assert result.failures[0].startswith(f"blocks.3.0.se.conv_expand: {FAULTS[no_batchnorm]}")


LCNETV2 = pytest.mark.skipif(not timm.is_model("lcnetv2_base"),
                             reason=f"lcnetv2_base is in timm >= 1.0.29, not in {timm.__version__}")


@pytest.mark.parametrize("name", ["hardcorenas_a", "lcnet_100", pytest.param("lcnetv2_base", marks=LCNETV2),
                                  "efficientformerv2_s0"])
def test_models_with_pooled_and_constant_features_pass(name):
    """Failed the old statistical rule at 32x32: SE gates and pooled heads (4 samples per
    feature, many constant), talking-heads attention over a single token (softmax = 1)."""
    kwargs = {"img_size": 32} if name.startswith("efficientformer") else {}
    result = check_conversion(timm.create_model(name, pretrained=False, **kwargs), torch.randn(4, 3, 32, 32))
    assert result.ok, result.failures


def test_float32_rounding_of_an_ill_conditioned_model_is_told_from_a_wrong_conversion():
    """fbnetv3_b at random init amplifies float32 rounding past the tolerance (its float32
    output is ~3e-2 from its float64 self); converted in float64 it matches to far below it."""
    result = check_conversion(timm.create_model("fbnetv3_b", pretrained=False), torch.randn(4, 3, 32, 32))
    assert result.rel_error > TOLERANCE and result.rel_error_float64 < 1e-6
    assert result.ok, result.failures


def test_a_slightly_wrong_fold_fails_in_float64_too(monkeypatch):
    fold = edits_module.fold_bn_into

    def wrong_fold(layer: nn.Module, norm: nn.Module) -> None:
        fold(layer, norm)
        with torch.no_grad():
            layer.weight.mul_(1.001)

    monkeypatch.setattr(edits_module, "fold_bn_into", wrong_fold)
    result = check_conversion(PATTERNS["chain"](), torch.randn(8, 3, 16, 16))
    assert result.rel_error > TOLERANCE and result.rel_error_float64 > TOLERANCE
    assert any(f.startswith("eval output changed") and "in float64" in f for f in result.failures), result.failures


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_4e"])
def test_layers_that_pad_or_reshape_the_ic_output_pass(name):
    """timm's Conv2dSame pads the IC output in its forward; CondConv2d folds the batch into groups
    (the tf_ CondConv model does both)."""
    result = check_conversion(timm.create_model(name, pretrained=False), torch.randn(4, 3, 32, 32))
    assert result.ok, result.failures
