"""Data-free statistics for new IC blocks (icrewrite.rewrite._init_stats): moments of act(z), z Gaussian."""
from __future__ import annotations

import torch
from torch import nn

from icrewrite.rewrite import activation_moments, site_moments


def test_data_free_moments_match_monte_carlo():
    mean, std = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 0.5, 2.0])
    z = torch.randn(400_000, 3) * std + mean
    for act in (nn.ReLU(), nn.SiLU(), nn.GELU()):
        m, v = activation_moments(act, mean, std)
        torch.testing.assert_close(m, act(z).mean(0), atol=0.01, rtol=0.02)
        torch.testing.assert_close(v, act(z).var(0), atol=0.01, rtol=0.03)


def test_site_moments_group_only_identical_activations():
    """One quadrature per distinct activation gives each site what its own call gives."""
    gen = torch.Generator().manual_seed(0)
    sites = {f"s{i}": (act, torch.randn(4 + i, generator=gen), torch.rand(4 + i, generator=gen) + 0.5)
             for i, act in enumerate([nn.ReLU(), nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.LeakyReLU(0.3),
                                      nn.PReLU(8), nn.SiLU()])}
    moments = site_moments(sites)
    assert moments.keys() == sites.keys()
    for name, (act, mean, std) in sites.items():
        expected = activation_moments(act, mean, std)
        torch.testing.assert_close(moments[name], expected, rtol=1e-6, atol=1e-7)
