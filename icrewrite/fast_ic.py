"""Fast CPU training path of the IC block: BatchNorm + Dropout as one differentiable operator.

Where the reference ``Dropout(BatchNorm(x))`` spends its time on CPU (torch.profiler,
resnet18/50 train steps) and what this path does instead:

- ``bernoulli_`` draws one float per element, the largest single cost, and Dropout keeps
  that float mask for backward. Here only the *dropped* positions are drawn, as the
  geometric gaps between them (about ``p * numel`` uniforms), zeroed with ``index_fill_``.
- training-mode ``native_batch_norm`` computes its statistics of NCHW tensors several
  times more slowly than it normalises; here the same two-pass statistics (mean, then
  squared deviations) are vectorised row reductions, and ``native_batch_norm`` only
  normalises (its eval mode, given those statistics).
- the dropout scale ``1/q`` is folded into the affine (``gamma/q``, ``beta/q``), so
  normalisation, affine and scale are one pass; no normalised or dropped-out copy is kept.

Backward is one copy of the gradient with the dropped positions zeroed and
``native_batch_norm_backward``. Eager autograd keeps the dropped positions (``8p`` bytes
per element); under ``torch.compile`` the path is a pair of ``torch.library`` custom
operators, which it keeps whole, and backward draws the positions again from their seed.
``IC.forward`` uses the path in CPU training (see :func:`applies`); elsewhere it runs the
reference modules (cuDNN and the fused CUDA dropout kernel serve them on GPUs).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["applies", "batch_norm_dropout", "norm_dropout", "dropped_positions"]

# Where the row-reduction statistics beat native_batch_norm's on CPU (measured: 4x faster
# at 16x64x24x24, 1.3x at 16x256x6x6; slower for rows of 3x3 and below 2**16 elements,
# where the fixed cost of their few more ops dominates).
_MIN_ROW = 16
_MIN_NUMEL = 2**16


def dropped_positions(numel: int, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted ``int64`` indices in ``[0, numel)``, each present independently with probability ``p``.

    A Bernoulli process drawn as the gaps between its successes: geometric variables
    ``floor(log(1 - U) / log(1 - p))`` from float64 uniforms ``U``, about ``p * numel`` of
    them, instead of one random number per element. The same ``seed`` gives the same
    positions, so backward regenerates them instead of keeping them.
    """
    generator = torch.Generator(device).manual_seed(seed)
    log_keep = math.log1p(-p)
    expected = numel * p
    batch = int(expected + 6.0 * math.sqrt(expected * (1.0 - p))) + 16  # rarely needs a second batch
    chunks, last = [], -1.0
    while last < numel:
        log_uniform = torch.rand(batch, dtype=torch.float64, device=device, generator=generator).neg_().log1p_()
        gaps = torch.div(log_uniform, log_keep, rounding_mode="floor").add_(1.0)
        chunks.append(gaps.cumsum_(0).add_(last))
        last = float(chunks[-1][-1])
    positions = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    count = int(torch.searchsorted(positions, float(numel)))
    return positions[:count].long()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order, as a 1-d view."""
    return t.as_strided((t.numel(),), (1,))


def _row_stats_pay_off(x: torch.Tensor) -> bool:
    """Whether :func:`_row_stats` beats ``native_batch_norm``'s own statistics for ``x``."""
    return (
        x.dtype in (torch.float32, torch.float64) and x.dim() > 2 and x.is_contiguous()
        and x.numel() >= _MIN_NUMEL and x.numel() >= _MIN_ROW * x.shape[0] * x.shape[1])


def _row_stats(x: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature batch mean and biased variance of a contiguous ``(N, C, *)`` tensor.

    Two passes like ``native_batch_norm`` (mean, then squared deviations), as vectorised
    reductions over the contiguous rows ``x[n, c]``. ``scratch`` (like ``x``) receives
    the deviations.
    """
    batch, features = x.shape[:2]
    mean = x.mean((0, *range(2, x.dim())))
    deviations = torch.sub(x, mean.view(features, *[1] * (x.dim() - 2)), out=scratch)
    var = torch.linalg.vector_norm(deviations.view(batch, features, -1), dim=2).square_().mean(0)
    return mean, var.div_(x.numel() // (batch * features))


def _batch_norm_train(
    x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of ``x`` into ``out``; returns the batch ``(mean, invstd)``."""
    features = x.shape[1]
    if not _row_stats_pay_off(x):
        stats = weight.new_empty(features), weight.new_empty(features)
        _, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps, out=(out, *stats))
        return mean, invstd
    mean, var = _row_stats(x, out)
    unused = weight.new_empty(0), weight.new_empty(0)
    torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps, out=(out, *unused))
    return mean, var.add_(eps).rsqrt_()


def _forward_kernel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float, eps: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output, batch mean, batch invstd, dropped positions)``; the affine carries the dropout scale."""
    keep = 1.0 - p
    out = torch.empty_like(x)
    mean, invstd = _batch_norm_train(x, out, weight / keep, bias / keep, eps)
    dropped = dropped_positions(out.numel(), p, seed, out.device)
    _flat(out).index_fill_(0, dropped, 0.0)
    return out, mean, invstd, dropped


def _backward_kernel(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    dropped: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_forward_kernel`'s output for ``x``, ``weight`` and ``bias``."""
    keep = 1.0 - p
    kept_grad = torch.empty_like(x).copy_(grad)  # the layout of the forward output, which `dropped` indexes
    _flat(kept_grad).index_fill_(0, dropped, 0.0)
    grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
        kept_grad, x, weight / keep, None, None, mean, invstd, True, eps, [True, True, True])
    return grad_x, grad_scale.div_(keep), grad_shift.div_(keep)


def _draw_seed() -> int:
    """A seed for the mask, from the default generator (so ``torch.manual_seed`` applies)."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


class _BatchNormDropout(torch.autograd.Function):
    """Eager autograd: backward keeps the dropped positions (``8p`` bytes per element)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, mean, invstd, dropped = _forward_kernel(x, weight, bias, p, eps, _draw_seed())
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, mean, invstd, dropped)
        ctx.p, ctx.eps = p, eps
        return out, mean, invstd

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return *_backward_kernel(grad, *ctx.saved_tensors, ctx.p, ctx.eps), None, None


# For torch.compile: custom operators, which it keeps whole (fake kernels give the shapes)
# instead of tracing into the data-dependent mask. Their outputs need static shapes, so
# backward gets the seed of the mask and draws the positions again.
@torch.library.custom_op("icrewrite::batch_norm_dropout", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward_kernel` with the seed of its mask in place of the positions."""
    seed = _draw_seed()
    out, mean, invstd, _ = _forward_kernel(x, weight, bias, p, eps, seed)
    return out, mean, invstd, torch.tensor(seed)


@_forward_op.register_fake
def _(x, weight, bias, p, eps):
    features = x.shape[1]
    return torch.empty_like(x), weight.new_empty(features), weight.new_empty(features), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("icrewrite::batch_norm_dropout_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    seed: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward_kernel`, drawing the dropped positions again from ``seed``."""
    dropped = dropped_positions(x.numel(), p, int(seed), x.device)
    return _backward_kernel(grad, x, weight, mean, invstd, dropped, p, eps)


@_backward_op.register_fake
def _(grad, x, weight, mean, invstd, seed, p, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _, p, eps = inputs
    _, mean, invstd, seed = output
    ctx.mark_non_differentiable(mean, invstd, seed)
    ctx.save_for_backward(x, weight, mean, invstd, seed)
    ctx.p, ctx.eps = p, eps


def _op_backward(ctx: Any, grad: torch.Tensor, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return *_backward_op(grad, *ctx.saved_tensors, ctx.p, ctx.eps), None, None


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own or global ones) that a fused path would skip."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
        or module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
        or module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks)


def _exporting(x: torch.Tensor) -> bool:
    """Whether an exporter or tracer records the call for another runtime (it needs the reference ops).

    ``torch.compile`` is not one: it keeps the fast path's custom operators as they are.
    """
    return (
        torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        or isinstance(x, torch.fx.Proxy))


def applies(norm: nn.Module, drop: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fast path computes ``drop(norm(x))`` for this call.

    True in CPU training (eager or compiled), for a plain affine BatchNorm that tracks running
    statistics (not SyncBatchNorm or another subclass with its own forward), an
    ``nn.Dropout`` with ``0 < p < 1``, more than one value per feature, and no hooks on
    either module.
    """
    return (
        norm.training and drop.training and not _exporting(x) and x.device.type == "cpu"
        and isinstance(norm, _BatchNorm) and type(norm).forward is _BatchNorm.forward
        and norm.affine and norm.track_running_stats
        and type(drop) is nn.Dropout and 0.0 < drop.p < 1.0
        and x.dim() >= 2 and x.numel() > x.shape[1]
        and not _hooked(norm) and not _hooked(drop))


def batch_norm_dropout(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, *, p: float, momentum: float = 0.1, eps: float = 1e-5,
) -> torch.Tensor:
    """Training-mode ``F.dropout(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps), p)``.

    For ``x`` of shape ``(N, C, *)`` on CPU and ``0 < p < 1``; updates the running
    statistics in place. Differentiable once in ``x``, ``weight`` and ``bias``.
    """
    if torch.compiler.is_compiling():
        out, mean, invstd, _ = _forward_op(x, weight, bias, p, eps)
    else:
        out, mean, invstd = _BatchNormDropout.apply(x, weight, bias, p, eps)
    count = x.numel() // x.shape[1]
    with torch.no_grad():  # the running statistics as BatchNorm updates them, with the unbiased variance
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(invstd.pow(-2).sub_(eps).mul_(count / (count - 1)), momentum)
    return out


def norm_dropout(norm: _BatchNorm, p: float, x: torch.Tensor) -> torch.Tensor:
    """``Dropout_p(norm(x))`` in training mode (see :func:`applies`), counting the batch as ``_BatchNorm.forward`` does."""
    norm.num_batches_tracked.add_(1)
    momentum = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    return batch_norm_dropout(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, p=p, momentum=momentum, eps=norm.eps)
