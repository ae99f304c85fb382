"""Running statistics for new IC blocks: data-free estimates or calibration on real batches.

An IC BatchNorm with running statistics ``(m, v)`` and ``gamma = sqrt(v + eps)``,
``beta = m`` is the identity in eval mode whatever ``(m, v)`` are; they only decide how
train-mode batches are normalised, so good values make training start where the
original network was.

Data-free: a removed BatchNorm with affine ``(gamma, beta)`` left its output roughly
``z ~ N(beta, gamma^2)``; the IC input is ``act(z)``, whose mean and variance are computed
by Gauss-Hermite quadrature for any elementwise activation.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..layers import IC, feature_columns
from ._patterns import Activation, FunctionActivation
from ._verify import eval_mode

__all__ = ["activation_moments", "site_moments", "calibrate"]

_QUADRATURE_POINTS = 48


@functools.cache
def _gauss_hermite() -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``(points, 1)`` and weights ``(points,)``: ``E[f(z)], z ~ N(0, 1)`` is about
    ``sum(w * f(sqrt(2) t))``."""
    nodes, weights = np.polynomial.hermite.hermgauss(_QUADRATURE_POINTS)
    return (torch.as_tensor(nodes * math.sqrt(2.0), dtype=torch.float32)[:, None],
            torch.as_tensor(weights / math.sqrt(math.pi), dtype=torch.float32))


@torch.no_grad()
def activation_moments(act: Activation, mean: torch.Tensor, std: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of ``act(z)`` for ``z ~ N(mean, std^2)`` (Gauss-Hermite).

    In float32, as activation modules hold float32 parameters (PReLU); the variance is taken
    around the mean (two passes), which keeps it accurate when the mean dominates.
    """
    t, w = _gauss_hermite()
    mu, sigma = mean.detach().float().cpu(), std.detach().float().cpu().abs()
    y = act(torch.addcmul(mu, t, sigma))  # (points, channels): channels on dim 1
    m1 = w @ y
    var = (w @ (y - m1).square_()).clamp_min_(1e-6)
    return m1.to(mean), var.to(mean)


_PLAIN = (int, float, bool, str, type(None))


def _activation_key(act: Activation, like: torch.Tensor) -> Hashable:
    """Activations that compute the same function share a key: parameter-free modules of one
    class and configuration (``inplace`` aside), equal function calls (``FunctionActivation``);
    anything else is its own."""
    if isinstance(act, nn.Module) and next(itertools.chain(act.parameters(), act.buffers()), None) is None:
        config = tuple(sorted((k, v) for k, v in vars(act).items()
                              if type(v) in _PLAIN and k not in ("training", "inplace")))
        return type(act), config, like.dtype, like.device
    if isinstance(act, FunctionActivation):
        return act, like.dtype, like.device
    return id(act)


def site_moments(sites: Mapping[str, tuple[Activation, torch.Tensor, torch.Tensor]]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`activation_moments` for many sites ``name -> (act, mean, std)``, one quadrature
    per distinct activation (a model has dozens of sites and a handful of activations)."""
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for name, (act, mean, _) in sites.items():
        groups[_activation_key(act, mean)].append(name)
    moments = {}
    for names in groups.values():
        act = sites[names[0]][0]
        mean, var = activation_moments(act, torch.cat([sites[n][1] for n in names]),
                                       torch.cat([sites[n][2] for n in names]))
        sizes = [sites[n][1].numel() for n in names]
        moments.update(zip(names, zip(mean.split(sizes), var.split(sizes))))
    return moments


def _batches(data: Iterable | torch.Tensor) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        yield data
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def calibrate(model: nn.Module, data: Iterable | torch.Tensor, *, max_batches: int = 8) -> int:
    """Set every IC block's statistics to those of its input on real batches.

    The model runs in eval mode, where each IC block is the identity (``set_identity``), so
    every block sees the input the original network gave it. Returns the batches used.
    """
    blocks = [m for m in model.modules() if isinstance(m, IC)]
    sums: dict[IC, list[torch.Tensor]] = {}

    def record(block: IC, args: tuple) -> None:
        x = feature_columns(args[0].detach(), block.feature_dim).double()
        acc = sums.setdefault(block, [torch.zeros(()), torch.zeros(()), torch.zeros(())])
        acc[0] = acc[0] + x.sum(0)
        acc[1] = acc[1] + (x * x).sum(0)
        acc[2] = acc[2] + x.shape[0]

    handles = [b.register_forward_pre_hook(record) for b in blocks]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    used = 0
    try:
        with eval_mode(model):
            for x in _batches(data):
                if used >= max_batches:
                    break
                model(x.to(device))
                used += 1
    finally:
        for h in handles:
            h.remove()
    for block, (s1, s2, n) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(1e-6)
        block.set_identity(mean.to(block.norm.running_mean), var.to(block.norm.running_var))
    return used
