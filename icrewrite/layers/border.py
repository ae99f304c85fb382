"""Convolutions with a constant output map: a folded IC block before a zero-padded convolution.

``conv_W(pad0(a x + b)) = conv_{W a}(pad0(x)) + conv_W(pad0(b 1))``: the second term is a
constant map, uniform inside and different at the border, precomputed at one input size
(``icrewrite.deploy.fold_ic``) and kept as the buffer ``border``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BorderCorrectedConv1d", "BorderCorrectedConv2d", "BorderCorrectedConv3d"]


class _BorderCorrection:
    """Mixin: add the constant map ``border`` (``(C_out, *spatial)``) to the convolution output."""

    border: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.border

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, border={tuple(self.border.shape)}"


class BorderCorrectedConv1d(_BorderCorrection, nn.Conv1d):
    """``nn.Conv1d`` plus a constant output map: a folded IC, exact at one input length."""


class BorderCorrectedConv2d(_BorderCorrection, nn.Conv2d):
    """``nn.Conv2d`` plus a constant output map: a folded IC, exact at one input size."""


class BorderCorrectedConv3d(_BorderCorrection, nn.Conv3d):
    """``nn.Conv3d`` plus a constant output map: a folded IC, exact at one input size."""
