"""Triton kernels of the IC block for CUDA tensors: one pass for normalisation, affine and dropout.

The dropout mask is never stored: ``tl.rand(seed, offset)`` (Philox) decides for each element,
by its offset in memory order, whether it is dropped, so backward draws the same mask again
from the seed alone. What the block keeps for backward is then its input, per-feature
statistics and one integer. :mod:`icrewrite.layers.fast` calls these for CUDA inputs (and,
in the tests, for CPU inputs under ``TRITON_INTERPRET=1``); the batch statistics and the
BatchNorm backward stay torch's own kernels (``batch_norm_stats``,
``native_batch_norm_backward``), which already read their input once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["batch_stats", "normalise_dropout", "drop"]

_BLOCK = 1024
MAX_NUMEL = 2**31 - 1  # tl.rand takes 32-bit offsets


@triton.jit
def _normalise_dropout_kernel(x_ptr, out_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr, numel, features, inner,
                              p, seed, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    feature = (offsets // inner) % features
    x = tl.load(x_ptr + offsets, mask=inside)
    mean = tl.load(mean_ptr + feature, mask=inside)
    invstd = tl.load(invstd_ptr + feature, mask=inside)
    scale = tl.load(scale_ptr + feature, mask=inside)
    shift = tl.load(shift_ptr + feature, mask=inside)
    y = (x - mean) * (invstd * scale) + shift
    keep = tl.rand(seed, offsets) >= p
    tl.store(out_ptr + offsets, tl.where(keep, y, 0.0), mask=inside)


@triton.jit
def _drop_kernel(grad_ptr, out_ptr, numel, p, seed, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=inside)
    keep = tl.rand(seed, offsets) >= p
    tl.store(out_ptr + offsets, tl.where(keep, grad, 0.0), mask=inside)


def feature_stride(x: torch.Tensor) -> int | None:
    """How many elements apart in memory order consecutive features of a dense ``(N, C, *)`` tensor are:
    the spatial size when contiguous, 1 when channels-last; ``None`` for other layouts."""
    if x.is_contiguous():
        return x.numel() // (x.shape[0] * x.shape[1])
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return 1 if channels_last is not None and x.is_contiguous(memory_format=channels_last) else None


def batch_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature batch ``(mean, invstd)`` of ``x`` (``(N, C, *)``), in float32 for lower-precision inputs."""
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x if x.dtype == torch.float64 else x.float(), dim=dims, correction=0)
    return mean, var.add_(eps).rsqrt_()


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, _BLOCK),)


def normalise_dropout(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, p: float,
    seed: int,
) -> torch.Tensor:
    """``(x - mean) * invstd * scale + shift`` per feature, the elements that ``seed`` drops with probability ``p``
    zeroed, in one pass; laid out like ``x``, which is contiguous or channels-last."""
    inner = feature_stride(x)
    out = torch.empty_like(x)
    _normalise_dropout_kernel[_grid(x.numel())](x, out, mean, invstd, scale, shift, x.numel(), x.shape[1], inner, p,
                                                seed, BLOCK=_BLOCK)
    return out


def drop(grad: torch.Tensor, p: float, seed: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad`` with the elements that :func:`normalise_dropout` dropped for ``seed`` zeroed (into ``out``, which may
    be ``grad`` itself); ``grad`` is laid out like that output."""
    out = torch.empty_like(grad) if out is None else out
    _drop_kernel[_grid(grad.numel())](grad, out, grad.numel(), p, seed, BLOCK=_BLOCK)
    return out
