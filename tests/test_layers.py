"""The IC block (icrewrite.layers.ic): BatchNorm + Dropout over the feature dim of a weight layer's input."""
from __future__ import annotations

import pytest
import torch

import icrewrite

from icrewrite.layers import IC
from icrewrite.testing import randomize_norms


@pytest.mark.parametrize("shape,feature_dim", [((6, 5, 4, 4), 1), ((6, 5, 7), 1), ((6, 5, 4, 4, 3), 1),
                                               ((6, 7, 5), -1), ((6, 5), -1)])
def test_ic_normalises_the_feature_dim(shape, feature_dim):
    ic = IC(5, p=0.0, feature_dim=feature_dim).train()
    x = torch.randn(shape) * 3 + 2
    y = ic(x)
    flat = (y.transpose(1, -1) if feature_dim == 1 else y).reshape(-1, 5)
    torch.testing.assert_close(flat.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)


def test_ic_eval_is_its_affine_map_and_set_identity_is_identity():
    ic = IC(5, p=0.3, feature_dim=-1)
    randomize_norms(ic, seed=3)
    ic.eval()
    x = torch.randn(4, 3, 5)
    scale, shift = ic.affine()
    torch.testing.assert_close(ic(x), x * scale + shift)
    ic.set_identity(torch.rand(5), torch.rand(5) + 0.5)
    torch.testing.assert_close(ic(x), x)


def test_ic_dropout_zeroes_a_fraction_p_in_training():
    ic = IC(64, p=0.5).train()
    y = ic(torch.randn(32, 64, 8, 8))
    assert 0.45 < (y == 0).float().mean().item() < 0.55


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_ic_rejects_invalid_p(p):
    with pytest.raises(icrewrite.ConversionError, match="p must be in"):  # the one check Options uses too
        IC(4, p=p)
