"""IC blocks in training with at most one value per feature (a batch of one before a Linear, an empty batch).

BatchNorm has no batch statistics there and raises; an IC block normalises with its running statistics instead,
leaves them unchanged and still applies dropout (see the IC docstring and docs/training.md).
"""
from __future__ import annotations

import copy

import pytest
import timm
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import icrewrite
from icrewrite.layers import IC, attach_ic
from icrewrite.layers import fast as fast_ic
from icrewrite.testing import randomize_norms
from nets import SMALL_CNN

P = 0.5


def running_state(ic: IC) -> list[torch.Tensor]:
    return [t.clone() for t in (ic.norm.running_mean, ic.norm.running_var, ic.norm.num_batches_tracked)]


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("shape,feature_dim", [((1, 64), -1), ((1, 64, 1, 1), 1), ((1, 1, 64), -1)])
def test_one_value_per_feature_normalises_by_the_running_statistics(monkeypatch, shape, feature_dim, fast, native):
    """On every path (reference modules, CPU operators, native small-block ops): the eval-mode map, then dropout."""
    monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", 2**62 if native else -1)
    ic = randomize_norms(IC(64, P, feature_dim=feature_dim), seed=1).train()
    ic.fast = fast
    before = running_state(ic)
    x = torch.randn(shape, requires_grad=True)
    y = ic(x)
    expected = ic.eval()(x)
    ic.train()
    kept = y != 0
    assert 0 < kept.sum() < kept.numel()  # dropout applies: about half of 64 dropped
    torch.testing.assert_close(y[kept], expected[kept] / (1 - P))
    for a, b in zip(running_state(ic), before, strict=True):
        assert torch.equal(a, b)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and ic.norm.weight.grad is not None


def test_the_fused_layer_takes_a_batch_of_one():
    layer = randomize_norms(attach_ic(nn.Linear(16, 3), IC(16, P, feature_dim=-1)), seed=1).train()
    before = running_state(layer.ic)
    x = torch.randn(1, 16)
    assert layer._fused_call(x) is None  # the block on its own: no batch statistics to fuse
    out = layer(x)
    out.sum().backward()
    assert out.shape == (1, 3) and layer.weight.grad is not None
    for a, b in zip(running_state(layer.ic), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [False, True])
def test_an_empty_batch_leaves_the_statistics(fast):
    ic = randomize_norms(IC(6, P), seed=1).train()
    ic.fast = fast
    before = running_state(ic)
    assert ic(torch.empty(0, 6, 4, 4)).shape == (0, 6, 4, 4)
    for a, b in zip(running_state(ic), before, strict=True):
        assert torch.equal(a, b)


def test_two_values_per_feature_still_use_the_batch():
    ic = randomize_norms(IC(8, P, feature_dim=-1), seed=1).train()
    ic.fast = False
    x = torch.randn(2, 8)
    y = ic(x)
    keep = (y != 0).float()
    torch.testing.assert_close(y, F.batch_norm(x, None, None, ic.norm.weight, ic.norm.bias, True) * keep / (1 - P))
    assert ic.norm.num_batches_tracked == 1


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.zero_grad()
    F.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    optimizer.step()


@pytest.mark.parametrize("name", [SMALL_CNN, "test_vit"])
def test_a_converted_timm_model_trains_a_step_with_a_batch_of_one(name):
    """The original trains with a batch of one (no BatchNorm sees a single value per channel: the classifier's
    input has none before it); after conversion an IC block sits before the classifier and must do so too."""
    original = timm.create_model(name, pretrained=False, num_classes=5)
    size = original.pretrained_cfg["input_size"][1:]
    x = torch.randn(1, 3, *size)
    train_step(copy.deepcopy(original), x)  # the original's behaviour with a batch of one: it trains
    converted = icrewrite.convert(original)
    head = converted.get_classifier()
    before = running_state(head.ic)
    train_step(converted, x)
    for a, b in zip(running_state(head.ic), before, strict=True):
        assert torch.equal(a, b)
    assert all(torch.isfinite(p).all() for p in converted.parameters())


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(0, 3), features=st.integers(1, 5), spatial=st.lists(st.integers(1, 3), max_size=2),
       tokens=st.booleans(), fast=st.booleans())
def test_any_batch_trains_and_touches_the_statistics_only_with_two_values_per_feature(
        batch, features, spatial, tokens, fast):
    """Whatever the batch (empty, one sample, one value per feature or more), a training step runs; the running
    statistics move exactly when every feature has at least two values."""
    feature_dim = -1 if tokens else 1
    shape = (batch, *spatial, features) if tokens else (batch, features, *spatial)
    ic = randomize_norms(IC(features, P, feature_dim=feature_dim), seed=1).train()
    ic.fast = fast
    before = running_state(ic)
    x = torch.randn(shape, requires_grad=True)
    y = ic(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    values_per_feature = x.numel() // features
    moved = [not torch.equal(a, b) for a, b in zip(running_state(ic), before, strict=True)]
    assert moved == [values_per_feature >= 2] * 3


def test_sync_batchnorm_keeps_its_own_statistics_across_processes():
    """After convert_sync_batchnorm the block's statistics span every process: the choice is SyncBatchNorm's (here,
    one process, it refuses one value per feature as BatchNorm does)."""
    ic = nn.SyncBatchNorm.convert_sync_batchnorm(IC(4, P, feature_dim=-1)).train()
    assert isinstance(ic.norm, nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ic(torch.randn(1, 4))
