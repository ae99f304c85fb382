"""Teach icrewrite your own layers: a convolution that applies its weight with F.conv2d, and an
attention that uses its qkv layer's weight functionally (docs/registry.md walks through it).

    python examples/register_custom_layers.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import icrewrite
from icrewrite.testing import check_conversion, randomize_norms


class ScaledConv(nn.Module):
    """A 3x3 convolution with a learned per-output gain, applied with F.conv2d."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels_out, channels_in, 3, 3) / math.sqrt(9 * channels_in))
        self.gain = nn.Parameter(torch.ones(channels_out, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.gain, padding=1)


class Attention(nn.Module):
    """Self-attention whose qkv projection is applied with F.linear and a separate bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.qkv_bias = nn.Parameter(torch.zeros(3 * dim))
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.chunk(3, dim=-1)
        return self.proj(F.scaled_dot_product_attention(q, k, v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(F.linear(x, self.qkv.weight, self.qkv_bias))


class RoutedAttention(Attention):
    """The same function, with qkv called as a module, so its IC block runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(self.qkv(x) + self.qkv_bias)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = ScaledConv(16, 16)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.attention = Attention(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(self.stem(x))))
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.head(self.attention(tokens).mean(1))


def find_route(attention: nn.Module, calls: object) -> icrewrite.Reroute | None:
    """How to make an ``Attention`` call ``qkv`` as a module (None: leave this module alone)."""
    if type(attention) is not Attention:
        return None
    return icrewrite.Reroute(layers=("qkv",), input_features=0, detail="qkv called as a module",
                             routed_class=RoutedAttention)


def main() -> None:
    model = randomize_norms(Net(), seed=0).eval()
    print("before registering:")
    print(icrewrite.plan(model), end="\n\n")

    icrewrite.register_weight_layer(ScaledConv, features=lambda m: (m.weight.shape[1], 1))
    icrewrite.register_reroute(Attention, find_route, routes_to=[RoutedAttention])
    print("after registering:")
    print(icrewrite.plan(model), end="\n\n")

    converted = icrewrite.convert(model)
    print(type(converted.conv).__name__, "is a ScaledConv:", isinstance(converted.conv, ScaledConv))
    print(type(converted.attention).__name__)
    result = check_conversion(model, torch.randn(8, 3, 8, 8))
    print(f"placement and function checks at {result.sites} sites:", "pass" if result.ok else result.failures)


if __name__ == "__main__":
    main()
