"""Fast training path of the IC block: BatchNorm + Dropout as one differentiable operator (CPU; CUDA with Triton).

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

Backward zeroes the dropped positions of the gradient and runs
``native_batch_norm_backward``. Eager autograd keeps the dropped positions (``8p`` bytes
per element); under ``torch.compile`` the path is a pair of ``torch.library`` custom
operators, which it keeps whole, and backward draws the positions again from their seed.

Before a plain convolution or ``Linear``, :func:`norm_dropout_layer` runs the IC block
and the layer as one operator whose backward rebuilds the IC output (one normalisation
pass) instead of keeping it for the layer's weight gradient: the memory of that output,
the largest part of the IC block's cost in memory, is not held between forward and
backward. Under ``torch.compile`` it is a custom operator too, whose backward draws the
positions again from the seed. ``IC.forward`` and ``ICWeightLayer.forward`` use these
paths in CPU training (see :func:`applies` and :func:`layer_call`).

On CUDA tensors the same operators run the Triton kernels of
:mod:`icrewrite.layers.triton_ic` instead of the positions: one pass normalises, scales and
drops, and the mask is drawn again from its seed wherever it is needed (backward, the
rebuilt output), so nothing of it is kept. ``CUDA_KERNELS`` (environment variable
``ICREWRITE_CUDA_IC``) set to ``"reference"`` runs the reference modules on CUDA instead.
Small tensors pay per call, and the fewer calls a block makes the better: a small contiguous
CPU input (``_NATIVE_NUMEL``) runs as native autograd ops instead (training-mode
``F.batch_norm`` with the dropout scale in its affine, then the same dropped positions zeroed
in place; backward keeps the output for the layer, as the reference modules do), and where
``native_batch_norm`` computes the statistics for the operators, the same call also gives the
output and updates the running statistics.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks
from torch.nn.modules.batchnorm import _BatchNorm

from .. import compat

__all__ = [
    "applies", "batch_norm_dropout", "norm_dropout", "dropped_positions",
    "ConvCall", "LinearCall", "LayerCall", "layer_call", "norm_dropout_layer",
]

# Where the row-reduction statistics beat native_batch_norm's on CPU (measured: 4x faster
# at 16x64x24x24, 1.3x at 16x256x6x6; slower for rows of 3x3 and below 2**16 elements,
# where the fixed cost of their few more ops dominates).
_MIN_ROW = 16
_MIN_NUMEL = 2**16
# The one-pass variance E[x^2] - E[x]^2 loses about log2(1 + mean^2 / var) bits to
# cancellation. Up to this ratio its float32 error stays within a few times that of two
# passes (about 1e-7 relative on post-ReLU activations, where the ratio is about 2).
_MAX_ONE_PASS_RATIO = 8.0
# CPU blocks on contiguous inputs of at most this many elements run as native autograd ops (_native_batch_norm_dropout):
# fewer calls per block, where per-call costs outweigh what the operators save (measured per shape and per model on
# mobilenetv3_small_100, resnet18 and the demo model: see docs/performance.md, "Small models on CPU").
_NATIVE_NUMEL = 2**18
# What IC blocks in CUDA training run: "triton" (icrewrite.layers.triton_ic, the mask drawn again from its seed in
# backward) or "reference" (the BatchNorm and Dropout modules: cuDNN, and what torch.compile fuses on its own).
CUDA_KERNELS = os.environ.get("ICREWRITE_CUDA_IC", "triton")


@functools.cache
def _triton() -> ModuleType | None:
    """:mod:`icrewrite.layers.triton_ic`, imported on first use (it imports Triton); ``None`` without Triton."""
    try:
        from . import triton_ic
    except ImportError:
        return None
    return triton_ic


def _uses_triton(x: torch.Tensor) -> bool:
    """Whether the block runs the Triton kernels on ``x``: a CUDA tensor, contiguous or channels-last, with
    ``CUDA_KERNELS`` set to them and Triton installed."""
    kernels = _triton() if x.is_cuda and CUDA_KERNELS == "triton" else None
    return kernels is not None and x.numel() <= kernels.MAX_NUMEL and kernels.feature_stride(x) is not None


def dropped_positions(numel: int, p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted ``int64`` indices in ``[0, numel)``, each present independently with probability ``p``.

    A Bernoulli process drawn as the gaps between its successes: geometric variables
    ``floor(log(1 - U) / log(1 - p)) + 1``, about ``p * numel`` of them, instead of one random
    number per element. ``U`` are float32 uniforms, like those ``nn.Dropout`` compares with
    ``p``; the gaps are summed in ``int64``. The same ``seed`` gives the same positions, so
    backward can regenerate them instead of keeping them.
    """
    generator = torch.Generator(device).manual_seed(seed)
    per_log_keep = 1.0 / math.log1p(-p)
    expected = numel * p
    batch = int(expected + 6.0 * math.sqrt(expected * (1.0 - p))) + 16  # rarely needs a second batch
    chunks, last = [], -1
    while True:
        uniform = torch.rand(batch, device=device, generator=generator)
        gaps = uniform.neg_().add_(1.0).log_().mul_(per_log_keep).floor_().add_(1.0)  # 1 - U: exact in float32
        positions = gaps.cumsum(0, dtype=torch.int64).add_(last)
        count = int(torch.searchsorted(positions, numel))
        chunks.append(positions[:count])
        if count < batch:
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        last = int(positions[-1])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order, as a 1-d view."""
    return t.as_strided((t.numel(),), (1,))


def _row_stats_pay_off(x: torch.Tensor) -> bool:
    """Whether :func:`_row_stats` beats ``native_batch_norm``'s own statistics for ``x``."""
    return (
        x.dtype in (torch.float32, torch.float64) and x.dim() > 2 and x.is_contiguous()
        and x.numel() >= _MIN_NUMEL and x.numel() >= _MIN_ROW * x.shape[0] * x.shape[1])


def _row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature batch mean and biased variance of a contiguous ``(N, C, *)`` tensor.

    Vectorised reductions over the contiguous rows ``x[n, c]``: one pass (row sums and sums
    of squares, combined in float64) where ``E[x^2] - E[x]^2`` keeps its precision, else
    two like ``native_batch_norm`` (:func:`_two_pass_row_stats`).
    """
    batch, features = x.shape[:2]
    rows = x.view(batch, features, -1)
    count = x.numel() // features
    mean = rows.sum(2).sum(0, dtype=torch.float64).div_(count)
    mean_square = mean.square()
    var = torch.linalg.vector_norm(rows, dim=2).double().square_().sum(0).div_(count).sub_(mean_square)
    if bool((mean_square > var * _MAX_ONE_PASS_RATIO).any()):
        return _two_pass_row_stats(x)
    return mean.to(x.dtype), var.to(x.dtype)


def _two_pass_row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_row_stats` in two passes: the mean, then the squared deviations."""
    batch, features = x.shape[:2]
    mean = x.mean((0, *range(2, x.dim())))
    deviations = x - mean.view(features, *[1] * (x.dim() - 2))
    var = torch.linalg.vector_norm(deviations.view(batch, features, -1), dim=2).square_().mean(0)
    return mean, var.div_(x.numel() // (batch * features))


@dataclass(frozen=True)
class BatchStats:
    """Per-feature batch statistics of an IC input: ``mean``, biased ``var`` and ``invstd = 1 / sqrt(var + eps)``.

    Rebuilding the output takes ``var`` (``native_batch_norm`` in eval mode), its backward ``invstd``.
    """

    mean: torch.Tensor
    var: torch.Tensor
    invstd: torch.Tensor


@dataclass(frozen=True)
class RunningStats:
    """BatchNorm's running statistics and the momentum of this batch's update."""

    mean: torch.Tensor
    var: torch.Tensor
    momentum: float


def _normalise(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, running: RunningStats | None,
) -> tuple[torch.Tensor, BatchStats]:
    """``x`` normalised with its batch statistics and mapped by ``scale`` and ``shift``, and those statistics;
    updates ``running`` (where given) as BatchNorm does.

    Row-reduction statistics where they pay off, then one eval-mode ``native_batch_norm``
    pass; else one training-mode ``native_batch_norm`` call, which computes the statistics,
    the output and the running update together (the fewest calls: small tensors pay per call).
    """
    if _row_stats_pay_off(x):
        mean, var = _row_stats(x)
        if running is not None:
            _update_running_stats(running, mean, var, x.numel() // x.shape[1])
        out = torch.native_batch_norm(x, scale, shift, mean, var, False, 0.0, eps)[0]
        return out, BatchStats(mean, var, var.add(eps).rsqrt_())
    running_mean, running_var, momentum = (None, None, 0.0) if running is None else (
        running.mean, running.var, running.momentum)
    out, mean, invstd = torch.native_batch_norm(x, scale, shift, running_mean, running_var, True, momentum, eps)
    return out, BatchStats(mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0), invstd)


# The mask of a block: on the Triton path, a 0-d int64 tensor holding the seed its kernels draw it from; else the
# dropped positions (a 1-d int64 tensor, see dropped_positions).

def _mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The mask of a block on ``x`` drawn from ``seed``: the seed itself where its kernels are Triton's."""
    return torch.tensor(seed) if _uses_triton(x) else dropped_positions(x.numel(), p, seed, x.device)


def _dropout_output(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, stats: BatchStats, dropped: torch.Tensor, p: float,
    eps: float,
) -> torch.Tensor:
    """The IC output: ``x`` normalised with ``stats`` and mapped by ``scale`` and ``shift`` (the affine over the
    keep probability) in one pass, the ``dropped`` mask applied. The same inputs give the same values."""
    if dropped.dim() == 0:
        return _triton().normalise_dropout(x, stats.mean, stats.invstd, scale, shift, p, int(dropped))
    out = torch.native_batch_norm(x, scale, shift, stats.mean, stats.var, False, 0.0, eps)[0]
    _flat(out).index_fill_(0, dropped, 0.0)
    return out


def _forward_kernel(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, p: float, eps: float, seed: int,
    running: RunningStats | None = None,
) -> tuple[torch.Tensor, BatchStats, torch.Tensor]:
    """``(output, batch statistics, mask)`` of the IC block in training mode; updates ``running``.

    ``scale`` and ``shift`` are the BatchNorm affine divided by the keep probability ``1 - p``.
    On the Triton path the statistics come first, then one pass normalises and drops.
    """
    mask = _mask(x, p, seed)
    if mask.dim() == 0:
        mean, invstd = _triton().batch_stats(x, eps)
        stats = BatchStats(mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0), invstd)
        if running is not None:
            _update_running_stats(running, mean, stats.var, x.numel() // x.shape[1])
        return _dropout_output(x, scale, shift, stats, mask, p, eps), stats, mask
    out, stats = _normalise(x, scale, shift, eps, running)
    _flat(out).index_fill_(0, mask, 0.0)
    return out, stats, mask


def _zero_dropped(grad: torch.Tensor, output: torch.Tensor, dropped: torch.Tensor, p: float, *,
                  owned: bool) -> torch.Tensor:
    """``grad`` with the ``dropped`` mask applied, laid out like ``output`` (whose memory order the mask indexes).

    In place when ``grad`` is ``owned`` (no one else holds it) and laid out like ``output``.
    """
    laid_out = grad.stride() == output.stride()
    if dropped.dim() == 0 and laid_out:
        return _triton().drop(grad, p, int(dropped), out=grad if owned else None)
    if not (owned and laid_out):
        grad = torch.empty_like(output).copy_(grad)
    if dropped.dim() == 0:
        return _triton().drop(grad, p, int(dropped), out=grad)
    _flat(grad).index_fill_(0, dropped, 0.0)
    return grad


def _backward_kernel(
    kept_grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    p: float, eps: float, needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for ``x`` and the BatchNorm weight and bias (where ``needs`` says) of :func:`_forward_kernel`'s output.

    ``kept_grad`` is the output's gradient with the dropped positions zeroed.
    """
    keep = 1.0 - p
    grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
        kept_grad, x, scale, None, None, mean, invstd, True, eps, list(needs))
    return grad_x, _div(grad_scale, keep), _div(grad_shift, keep)


def _div(t: torch.Tensor | None, divisor: float) -> torch.Tensor | None:
    return None if t is None else t.div_(divisor)


def _scaled_affine(weight: torch.Tensor, bias: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The BatchNorm affine with the dropout scale ``1 / (1 - p)`` folded in."""
    keep = 1.0 - p
    return torch.div(weight, keep), torch.div(bias, keep)


def _draw_seed() -> int:
    """A seed for the mask, from the default generator (so ``torch.manual_seed`` applies)."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


class _BatchNormDropout(torch.autograd.Function):
    """Eager autograd: backward keeps the dropped positions (``8p`` bytes per element); forward updates the
    running statistics."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running: RunningStats,
                p: float, eps: float) -> torch.Tensor:
        scale, shift = _scaled_affine(weight, bias, p)
        out, stats, dropped = _forward_kernel(x, scale, shift, p, eps, _draw_seed(), running)
        ctx.save_for_backward(x, scale, stats.mean, stats.invstd, dropped)
        ctx.p, ctx.eps = p, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, mean, invstd, dropped = ctx.saved_tensors
        kept_grad = _zero_dropped(grad, x, dropped, ctx.p, owned=False)  # the forward output was laid out like x
        return *_backward_kernel(kept_grad, x, scale, mean, invstd, ctx.p, ctx.eps), None, None, None


# For torch.compile: custom operators, which it keeps whole (fake kernels give the shapes)
# instead of tracing into the data-dependent mask. Their outputs need static shapes, so
# backward gets the seed of the mask and draws the positions again.
@torch.library.custom_op("icrewrite::batch_norm_dropout", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward_kernel` with the seed of its mask in place of the positions."""
    seed = _draw_seed()
    out, stats, _ = _forward_kernel(x, *_scaled_affine(weight, bias, p), p, eps, seed)
    return out, stats.mean, stats.var, torch.tensor(seed)


@_forward_op.register_fake
def _(x, weight, bias, p, eps):
    features = x.shape[1]
    return torch.empty_like(x), weight.new_empty(features), weight.new_empty(features), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("icrewrite::batch_norm_dropout_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    seed: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward_kernel`, drawing the mask again from ``seed``."""
    kept_grad = _zero_dropped(grad, x, _mask(x, p, int(seed)), p, owned=False)
    return _backward_kernel(kept_grad, x, torch.div(weight, 1.0 - p), mean, var.add(eps).rsqrt_(), p, eps)


@_backward_op.register_fake
def _(grad, x, weight, mean, var, seed, p, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, weight, _, p, eps = inputs
    _, mean, var, seed = output
    ctx.mark_non_differentiable(mean, var, seed)
    ctx.save_for_backward(x, weight, mean, var, seed)
    ctx.p, ctx.eps = p, eps


def _op_backward(ctx: Any, grad: torch.Tensor, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return *_backward_op(grad, *ctx.saved_tensors, ctx.p, ctx.eps), None, None


_forward_op.register_autograd(_op_backward, setup_context=_setup_context)


@dataclass(frozen=True)
class ConvCall:
    """A plain convolution (zero padding, not transposed): its forward and backward as aten calls."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        no_output_padding = (0,) * len(self.stride)
        return torch.convolution(y, weight, bias, self.stride, self.padding, self.dilation, False, no_output_padding,
                                 self.groups)

    def backward(self, grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                 needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        """Gradients for the input ``y``, ``weight`` and the bias, where ``needs`` says."""
        return torch.ops.aten.convolution_backward(
            grad, y, weight, [weight.shape[0]] if has_bias else None, self.stride, self.padding, self.dilation, False,
            [0] * len(self.stride), self.groups, [needs[0], needs[1], has_bias and needs[2]])


class LinearCall:
    """``Linear`` on a 2-d input: its forward and backward as matrix products."""

    def forward(self, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(y, weight, bias)

    def backward(self, grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                 needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        """Gradients for the input ``y``, ``weight`` and the bias, where ``needs`` says."""
        return (grad.mm(weight) if needs[0] else None, grad.t().mm(y) if needs[1] else None,
                grad.sum(0) if has_bias and needs[2] else None)


LayerCall = ConvCall | LinearCall
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR = LinearCall()


def _layer_backward_kernel(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, stats: BatchStats,
    dropped: torch.Tensor, weight: torch.Tensor, has_bias: bool, p: float, eps: float, call: LayerCall,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for ``x``, the BatchNorm weight and bias, the layer's weight and bias (where ``needs`` says) of
    ``call`` on :func:`_forward_kernel`'s output (``scale`` and ``shift``: the affine over the keep probability).
    Rebuilds the IC output from ``x`` (the same values up to rounding) instead of keeping it."""
    y = _dropout_output(x, scale, shift, stats, dropped, p, eps)
    norm_needs = needs[:3]
    grad_y, grad_weight, grad_bias = call.backward(grad, y, weight, has_bias, (any(norm_needs), *needs[3:5]))
    norm_grads = (None, None, None)
    if any(norm_needs):
        kept_grad = _zero_dropped(grad_y, y, dropped, p, owned=True)
        del y, grad_y  # one rebuilt output alive at a time
        norm_grads = _backward_kernel(kept_grad, x, scale, stats.mean, stats.invstd, p, eps, norm_needs)
    return *norm_grads, grad_weight, grad_bias


class _NormDropoutLayer(torch.autograd.Function):
    """``call(Dropout(BatchNorm(x)))``; backward rebuilds the IC output from ``x`` instead of keeping it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, running: RunningStats, p: float, eps: float, call: LayerCall) -> torch.Tensor:
        scale, shift = _scaled_affine(norm_weight, norm_bias, p)
        y, stats, dropped = _forward_kernel(x, scale, shift, p, eps, _draw_seed(), running)
        ctx.save_for_backward(x, scale, shift, stats.mean, stats.var, stats.invstd, dropped, weight)
        ctx.p, ctx.eps, ctx.call, ctx.has_bias = p, eps, call, bias is not None
        return call.forward(y, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, shift, mean, var, invstd, dropped, weight = ctx.saved_tensors
        grads = _layer_backward_kernel(grad, x, scale, shift, BatchStats(mean, var, invstd), dropped, weight,
                                       ctx.has_bias, ctx.p, ctx.eps, ctx.call, ctx.needs_input_grad[:5])
        return *grads, None, None, None, None


# For torch.compile, the same as custom operators (like the lone block's above): the layer
# is described by its convolution arguments (empty for Linear), backward gets the seed.
def _call_of(stride: list[int], padding: list[int], dilation: list[int], groups: int) -> LayerCall:
    """The layer that :func:`_call_args` described: a convolution, or ``Linear`` for an empty ``stride``."""
    return ConvCall(tuple(stride), tuple(padding), tuple(dilation), groups) if stride else _LINEAR


def _call_args(call: LayerCall) -> tuple[list[int], list[int], list[int], int]:
    if isinstance(call, ConvCall):
        return list(call.stride), list(call.padding), list(call.dilation), call.groups
    return [], [], [], 1


@torch.library.custom_op("icrewrite::norm_dropout_layer", mutates_args=())
def _layer_forward_op(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, p: float, eps: float, stride: list[int], padding: list[int], dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IC block (:func:`_forward_kernel`) then the layer, with the seed of its mask in place of the positions."""
    seed = _draw_seed()
    y, stats, _ = _forward_kernel(x, *_scaled_affine(norm_weight, norm_bias, p), p, eps, seed)
    out = _call_of(stride, padding, dilation, groups).forward(y, weight, bias)
    return out, stats.mean, stats.var, torch.tensor(seed)


@_layer_forward_op.register_fake
def _(x, norm_weight, norm_bias, weight, bias, p, eps, stride, padding, dilation, groups):
    out = _call_of(stride, padding, dilation, groups).forward(torch.empty_like(x), weight, bias)
    features = x.shape[1]
    return (out, norm_weight.new_empty(features), norm_weight.new_empty(features),
            torch.empty((), dtype=torch.int64))


@torch.library.custom_op("icrewrite::norm_dropout_layer_backward", mutates_args=())
def _layer_backward_op(
    grad: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, mean: torch.Tensor,
    var: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor, has_bias: bool, p: float, eps: float,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_layer_backward_kernel` for every input, drawing the mask again from ``seed``;
    the bias gradient is empty for a layer without bias."""
    stats = BatchStats(mean, var, var.add(eps).rsqrt_())
    grads = _layer_backward_kernel(grad, x, *_scaled_affine(norm_weight, norm_bias, p), stats, _mask(x, p, int(seed)),
                                   weight, has_bias, p, eps, _call_of(stride, padding, dilation, groups), (True,) * 5)
    return *grads[:4], grads[4] if has_bias else weight.new_empty(0)


@_layer_backward_op.register_fake
def _(grad, x, norm_weight, norm_bias, mean, var, seed, weight, has_bias, p, eps, stride, padding, dilation, groups):
    grad_bias = weight.new_empty(weight.shape[0] if has_bias else 0)
    return (torch.empty_like(x), torch.empty_like(norm_weight), torch.empty_like(norm_bias), torch.empty_like(weight),
            grad_bias)


def _layer_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, norm_weight, norm_bias, weight, bias, p, eps, *call_args = inputs
    _, mean, var, seed = output
    ctx.mark_non_differentiable(mean, var, seed)
    ctx.save_for_backward(x, norm_weight, norm_bias, mean, var, seed, weight)
    ctx.has_bias, ctx.p, ctx.eps, ctx.call_args = bias is not None, p, eps, call_args


def _layer_op_backward(ctx: Any, grad: torch.Tensor, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    *grads, grad_bias = _layer_backward_op(grad, *ctx.saved_tensors, ctx.has_bias, ctx.p, ctx.eps, *ctx.call_args)
    return *grads, grad_bias if ctx.has_bias else None, None, None, None, None, None, None


_layer_forward_op.register_autograd(_layer_op_backward, setup_context=_layer_setup_context)


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
        compat.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        or isinstance(x, torch.fx.Proxy))


def applies(norm: nn.Module, drop: nn.Module, x: torch.Tensor, feature_dim: int = 1) -> bool:
    """Whether the fast path computes ``drop(norm(x))`` for this call (features along ``feature_dim`` of ``x``).

    True in CPU training and in CUDA training where the Triton kernels apply (:func:`_uses_triton`), eager or
    compiled, for a plain affine BatchNorm that tracks running
    statistics (not SyncBatchNorm or another subclass with its own forward), an
    ``nn.Dropout`` with ``0 < p < 1``, more than one value per feature, and no hooks on
    either module.
    """
    return (
        norm.training and drop.training and not _exporting(x) and (x.device.type == "cpu" or _uses_triton(x))
        and isinstance(norm, _BatchNorm) and type(norm).forward is _BatchNorm.forward
        and norm.affine and norm.track_running_stats
        and type(drop) is nn.Dropout and 0.0 < drop.p < 1.0
        and x.dim() >= 2 and x.numel() > x.shape[feature_dim]
        and not _hooked(norm) and not _hooked(drop))


def layer_call(ic: nn.Module, layer: nn.Module, base: type[nn.Module], x: torch.Tensor) -> LayerCall | None:
    """How :func:`norm_dropout_layer` calls ``layer`` after its IC block ``ic``, or ``None`` where it does not fuse them.

    ``base`` is the layer's class before the IC swap: a plain ``Conv1d/2d/3d`` (zero padding
    given as sizes) or ``Linear`` fuses, subclasses with their own forward do not. None
    under autocast (which casts the layer's input, not the block's), where hooks are
    registered on ``ic`` itself, which a fused call would skip, and for an input ``x`` that
    the block runs as native ops (small, see :func:`batch_norm_dropout`). The IC's own fast
    path must apply too (:func:`applies`).
    """
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda") or _hooked(ic) or _runs_natively(x):
        return None
    if base is nn.Linear:
        return _LINEAR
    if base in _CONVOLUTIONS and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return ConvCall(layer.stride, layer.padding, layer.dilation, layer.groups)
    return None


def _count_batch(norm: _BatchNorm) -> float:
    """Count the batch in ``norm.num_batches_tracked`` as ``_BatchNorm.forward`` does; the momentum of its update."""
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def _update_running_stats(running: RunningStats, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """BatchNorm's update of the running statistics from the batch ones (unbiased variance)."""
    with torch.no_grad():
        running.mean.lerp_(mean, running.momentum)
        running.var.lerp_(var * (count / (count - 1)), running.momentum)


def batch_norm_dropout(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, *, p: float, momentum: float = 0.1, eps: float = 1e-5,
) -> torch.Tensor:
    """Training-mode ``F.dropout(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps), p)``.

    For ``x`` of shape ``(N, C, *)`` on CPU and ``0 < p < 1``; updates the running
    statistics in place. Differentiable in ``x``, ``weight`` and ``bias``: once through the
    operators, as often as autograd allows for small inputs, which run as native ops.
    """
    if _runs_natively(x):
        return _native_batch_norm_dropout(x, running_mean, running_var, weight, bias, p, momentum, eps)
    running = RunningStats(running_mean, running_var, momentum)
    if not torch.compiler.is_compiling():
        return _BatchNormDropout.apply(x, weight, bias, running, p, eps)
    out, mean, var, _ = _forward_op(x, weight, bias, p, eps)
    _update_running_stats(running, mean, var, x.numel() // x.shape[1])
    return out


def _runs_natively(x: torch.Tensor) -> bool:
    """Whether the block on ``x`` runs as native autograd ops (:func:`_native_batch_norm_dropout`): a small contiguous
    CPU tensor (``_NATIVE_NUMEL``) in eager mode."""
    return (x.numel() <= _NATIVE_NUMEL and x.device.type == "cpu" and x.is_contiguous()
            and not torch.compiler.is_compiling())


def _native_batch_norm_dropout(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    p: float, momentum: float, eps: float,
) -> torch.Tensor:
    """:func:`batch_norm_dropout` as native autograd ops: training-mode ``F.batch_norm`` with the dropout scale in
    the affine, then the dropped positions zeroed in place (``put_``), the same mask that the operators draw from
    the same seed. The fewest calls per block; backward keeps what the reference modules keep, with the positions
    in place of a float mask."""
    out = F.batch_norm(x, running_mean, running_var, *_scaled_affine(weight, bias, p), True, momentum, eps)
    dropped = dropped_positions(out.numel(), p, _draw_seed(), out.device)
    # In place: batch_norm's backward keeps x, not out.
    return out.put_(dropped, out.new_zeros(()).expand(dropped.shape[0]))


def norm_dropout(norm: _BatchNorm, p: float, x: torch.Tensor) -> torch.Tensor:
    """``Dropout_p(norm(x))`` in training mode (see :func:`applies`), counting the batch as ``_BatchNorm.forward`` does."""
    momentum = _count_batch(norm)
    return batch_norm_dropout(
        x, norm.running_mean, norm.running_var, norm.weight, norm.bias, p=p, momentum=momentum, eps=norm.eps)


def norm_dropout_layer(
    norm: _BatchNorm, p: float, x: torch.Tensor, call: LayerCall, weight: torch.Tensor, bias: torch.Tensor | None,
) -> torch.Tensor:
    """``call`` (a weight layer with ``weight`` and ``bias``) on ``Dropout_p(norm(x))`` in training mode, as one operator.

    What :func:`norm_dropout` then the layer compute, with the same values, running
    statistics and gradients, but backward keeps only what rebuilds the IC output: ``x``
    (which the operation before keeps anyway), per-feature statistics and the dropped
    positions. Differentiable once.
    """
    running = RunningStats(norm.running_mean, norm.running_var, _count_batch(norm))
    if not torch.compiler.is_compiling():
        return _NormDropoutLayer.apply(x, norm.weight, norm.bias, weight, bias, running, p, norm.eps, call)
    out, mean, var, _ = _layer_forward_op(x, norm.weight, norm.bias, weight, bias, p, norm.eps, *_call_args(call))
    _update_running_stats(running, mean, var, x.numel() // x.shape[1])
    return out
