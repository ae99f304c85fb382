"""Triton kernels of the IC block: one pass applies the per-feature affine and the dropout mask.

The dropout mask is never stored: Philox (``tl.rand4x(seed, counter)``, four uniforms per call)
decides for each element, by its offset in memory order, whether it is dropped, so backward
draws the same mask again from the seed alone. The seed is a 0-d ``int64`` tensor on the
device that the caller draws from PyTorch's generator (eager: ``torch.randint``; under
``torch.compile``: an op in the graph), so a captured CUDA graph draws a new mask per replay,
and no kernel is specialised on its value. What a block keeps for backward is then its input,
per-feature statistics and that seed.

The kernels are ``torch.library.triton_op`` operators that launch through ``wrap_triton``
(where torch provides them: Inductor then sees the kernels themselves), each launch under a
guard for the tensor's device. Integer arguments are not specialised on, so one variant per
dtype is compiled. :mod:`icrewrite.layers.fast` calls these for CUDA inputs (and, in the
tests, for CPU inputs under ``TRITON_INTERPRET=1``); the batch statistics and the BatchNorm
backward stay torch's own kernels (``batch_norm_stats``, ``native_batch_norm_backward``).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton
import triton.language as tl

from .fast import compute_dtype

__all__ = ["batch_stats", "normalise_dropout", "drop", "feature_stride", "MAX_NUMEL"]

_QUARTER = 256  # Philox calls per program; each gives the uniforms of four elements, _QUARTER apart
_BLOCK = 4 * _QUARTER
MAX_NUMEL = 2**31 - 1  # 32-bit offsets and Philox counters


@triton.jit
def _normalise_part(x_ptr, out_ptr, scale_ptr, shift_ptr, offsets, numel, features, inner, uniform, p):
    inside = offsets < numel
    feature = (offsets // inner) % features
    scale = tl.load(scale_ptr + feature, mask=inside, other=0.0)
    shift = tl.load(shift_ptr + feature, mask=inside, other=0.0)
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(scale.dtype)
    y = tl.where(uniform >= p, x * scale + shift, 0.0)
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["numel", "features", "inner"])
def _normalise_dropout_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, seed_ptr, numel, features, inner, p,
                              QUARTER: tl.constexpr):
    start = tl.program_id(0) * (4 * QUARTER)
    lanes = tl.arange(0, QUARTER)
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), tl.program_id(0) * QUARTER + lanes)
    _normalise_part(x_ptr, out_ptr, scale_ptr, shift_ptr, start + lanes, numel, features, inner, u0, p)
    _normalise_part(x_ptr, out_ptr, scale_ptr, shift_ptr, start + QUARTER + lanes, numel, features, inner, u1, p)
    _normalise_part(x_ptr, out_ptr, scale_ptr, shift_ptr, start + 2 * QUARTER + lanes, numel, features, inner, u2, p)
    _normalise_part(x_ptr, out_ptr, scale_ptr, shift_ptr, start + 3 * QUARTER + lanes, numel, features, inner, u3, p)


@triton.jit
def _drop_part(grad_ptr, out_ptr, offsets, numel, uniform, p):
    inside = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0)
    tl.store(out_ptr + offsets, tl.where(uniform >= p, grad, 0.0), mask=inside)


@triton.jit(do_not_specialize=["numel"])
def _drop_kernel(grad_ptr, out_ptr, seed_ptr, numel, p, QUARTER: tl.constexpr):
    start = tl.program_id(0) * (4 * QUARTER)
    lanes = tl.arange(0, QUARTER)
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), tl.program_id(0) * QUARTER + lanes)
    _drop_part(grad_ptr, out_ptr, start + lanes, numel, u0, p)
    _drop_part(grad_ptr, out_ptr, start + QUARTER + lanes, numel, u1, p)
    _drop_part(grad_ptr, out_ptr, start + 2 * QUARTER + lanes, numel, u2, p)
    _drop_part(grad_ptr, out_ptr, start + 3 * QUARTER + lanes, numel, u3, p)


# torch.library.triton_op and wrap_triton (torch >= 2.6): operators whose kernels Inductor sees. Without them, an
# opaque custom operator that launches the kernels itself.
_TRITON_OP = getattr(torch.library, "triton_op", None)
_WRAP = getattr(torch.library, "wrap_triton", None)


def _operator(name: str):
    if _TRITON_OP is not None and _WRAP is not None:
        return _TRITON_OP(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


def _launch(kernel: Any) -> Any:
    """``kernel`` wrapped for tracing where torch can (a compiled kernel; older torch refuses the interpreter's)."""
    return _WRAP(kernel) if _WRAP is not None and isinstance(kernel, triton.runtime.jit.JITFunction) else kernel


def _on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A guard that makes ``x``'s device current for a launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def feature_stride(x: torch.Tensor) -> int | None:
    """How many elements apart in memory order consecutive features of a dense ``(N, C, *)`` tensor are:
    the spatial size when contiguous, 1 when channels-last; ``None`` for other layouts and empty tensors."""
    if x.dim() < 2 or x.numel() == 0:
        return None
    if x.is_contiguous():
        return x.numel() // (x.shape[0] * x.shape[1])
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return 1 if channels_last is not None and x.is_contiguous(memory_format=channels_last) else None


def batch_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature batch ``(mean, invstd)`` of ``x`` (``(N, C, *)``), in :func:`compute_dtype`."""
    if x.is_cuda:
        with _on_device(x):
            mean, invstd = torch.batch_norm_stats(x, eps)
        return mean.to(compute_dtype(x.dtype)), invstd.to(compute_dtype(x.dtype))
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), dim=dims, correction=0)
    return mean, var.add(eps).rsqrt()


def _grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, _BLOCK),)


@_operator("icrewrite::philox_normalise_dropout")
def normalise_dropout(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, seed: torch.Tensor,
                      p: float) -> torch.Tensor:
    """``x * scale + shift`` per feature (``scale`` and ``shift`` in :func:`compute_dtype`), the elements that
    ``seed`` drops with probability ``p`` zeroed, in one pass; laid out like ``x``, which is contiguous or
    channels-last."""
    out = torch.empty_like(x)
    if x.numel():
        with _on_device(x):
            _launch(_normalise_dropout_kernel)[_grid(x.numel())](
                x, out, scale, shift, seed, x.numel(), x.shape[1], feature_stride(x), p, QUARTER=_QUARTER)
    return out


if _TRITON_OP is None or _WRAP is None:
    @normalise_dropout.register_fake
    def _(x, scale, shift, seed, p):
        return torch.empty_like(x)


@_operator("icrewrite::philox_drop")
def drop(grad: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``grad`` with the elements that :func:`normalise_dropout` dropped for ``seed`` zeroed; ``grad`` is laid out
    like that output (dense: the mask indexes memory order)."""
    out = torch.empty_like(grad)
    if grad.numel():
        with _on_device(grad):
            _launch(_drop_kernel)[_grid(grad.numel())](grad, out, seed, grad.numel(), p, QUARTER=_QUARTER)
    return out


if _TRITON_OP is None or _WRAP is None:
    @drop.register_fake
    def _(grad, seed, p):
        return torch.empty_like(grad)
