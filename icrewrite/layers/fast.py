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
positions again from the seed. Under autocast the layer runs in the autocast dtype, as it
would after the unfused block. ``IC.forward`` and ``ICWeightLayer.forward`` use these
paths in CPU training (see :func:`applies` and :func:`layer_call`).

On CUDA, IC blocks run the reference modules (cuDNN BatchNorm and Dropout; under
``torch.compile``, what Inductor fuses of them) unless the CUDA path (:func:`set_cuda_path`,
or the environment variable ``ICREWRITE_CUDA_IC``, read when a block decides) is
``"triton"`` or ``"auto"``. Then the same blocks run the Triton kernels of
:mod:`icrewrite.layers.triton_ic`: one pass normalises, scales and drops, and the mask is
drawn again from a seed tensor wherever it is needed (backward, the rebuilt output), so
nothing of it is kept. ``"auto"`` first checks the kernels against the reference on a small
input, once per device, dtype and memory format, and falls back to the reference, with one
warning saying why, on any failure. Which mask a block drew (:class:`MaskKind`) is decided
in forward and recorded for backward.

Small tensors pay per call, and the fewer calls a block makes the better: a small contiguous
CPU input (``_NATIVE_NUMEL``) runs as native autograd ops instead (training-mode
``F.batch_norm`` with the dropout scale in its affine, then the same dropped positions zeroed
in place; backward keeps the output for the layer, as the reference modules do), and where
``native_batch_norm`` computes the statistics for the operators, the same call also gives the
output and updates the running statistics.
"""
from __future__ import annotations

import enum
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as module_hooks
from torch.nn.modules.batchnorm import _BatchNorm

from .. import compat
from ..errors import ICRewriteError

__all__ = [
    "applies", "batch_norm_dropout", "norm_dropout", "dropped_positions",
    "ConvCall", "LinearCall", "LayerCall", "layer_call", "norm_dropout_layer",
    "CUDA_PATHS", "set_cuda_path", "cuda_path", "check_triton", "MaskKind",
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

# What IC blocks in CUDA training run (set_cuda_path, or the environment variable below when that is unset):
# "reference" (the BatchNorm and Dropout modules: cuDNN, and what torch.compile fuses on its own; the default),
# "triton" (icrewrite.layers.triton_ic, unchecked) or "auto" (Triton where its self-check passed, else the reference).
CUDA_PATHS = ("reference", "triton", "auto")
CUDA_PATH_VARIABLE = "ICREWRITE_CUDA_IC"
_cuda_path: str | None = None  # set_cuda_path's setting; None: the environment decides
# Device types whose tensors may take the Triton path (the tests add "cpu" under TRITON_INTERPRET=1).
_TRITON_DEVICES = frozenset({"cuda"})
_MAX_TRITON_NUMEL = 2**31 - 1  # triton_ic.MAX_NUMEL, known without importing Triton
# Per (path, device, dtype, memory format): None where the Triton path runs, else why it does not.
_TRITON_REFUSALS: dict[tuple[str, str, torch.dtype, str], str | None] = {}


class MaskKind(enum.Enum):
    """How a block's dropout mask is drawn and kept for backward. Forward decides it (:func:`_mask_kind`) and runs
    the autograd Function or operator of that kind, whose backward follows it: nothing is decided again there."""

    POSITIONS = "positions"  # the dropped positions (dropped_positions): a 1-d int64 tensor
    PHILOX = "philox"        # the Triton kernels' Philox mask: a 0-d int64 seed tensor on the input's device


def _mask_kind(x: torch.Tensor) -> MaskKind:
    """The mask a block on ``x`` draws: Philox where the Triton path runs (:func:`_uses_triton`), else positions."""
    return MaskKind.PHILOX if _uses_triton(x) else MaskKind.POSITIONS


def set_cuda_path(path: str | None) -> None:
    """Choose what IC blocks run in CUDA training: ``"reference"`` (the BatchNorm and Dropout modules, the default),
    ``"triton"`` (the Triton kernels) or ``"auto"`` (the Triton kernels where a self-check against the reference
    passes on the device, dtype and memory format, else the reference); ``None`` leaves it to the environment
    variable ``ICREWRITE_CUDA_IC``. Forgets earlier self-checks."""
    global _cuda_path
    if path is not None and path not in CUDA_PATHS:
        raise ICRewriteError(f"the CUDA path must be one of {', '.join(CUDA_PATHS)}, got {path!r}")
    _cuda_path = path
    _TRITON_REFUSALS.clear()


def cuda_path() -> str:
    """The CUDA path in force: :func:`set_cuda_path`'s setting, else ``ICREWRITE_CUDA_IC`` (read now), else
    ``"reference"``. An environment value that is not a path means the reference, with one warning."""
    if _cuda_path is not None:
        return _cuda_path
    value = os.environ.get(CUDA_PATH_VARIABLE, "reference").strip().lower() or "reference"
    if value not in CUDA_PATHS:
        _warn_once(("variable", value), f"{CUDA_PATH_VARIABLE}={value!r} is not one of {', '.join(CUDA_PATHS)}; "
                                        "IC blocks on CUDA run the reference BatchNorm and Dropout")
        return "reference"
    return value


_WARNED: set[tuple] = set()


def _warn_once(key: tuple, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _layout(x: torch.Tensor) -> str | None:
    """``"contiguous"`` or ``"channels_last"`` (the layouts the Triton kernels take), else ``None``."""
    if x.is_contiguous():
        return "contiguous"
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return "channels_last" if channels_last is not None and x.is_contiguous(memory_format=channels_last) else None


def _uses_triton(x: torch.Tensor) -> bool:
    """Whether the block runs the Triton kernels on ``x``: a non-empty tensor on a CUDA device, contiguous or
    channels-last, where the CUDA path (:func:`cuda_path`) chooses them for its device, dtype and layout."""
    if x.device.type not in _TRITON_DEVICES or not 0 < x.numel() <= _MAX_TRITON_NUMEL or x.dim() < 2:
        return False
    layout = _layout(x)
    return layout is not None and _triton_chosen(x.device, x.dtype, layout)


@torch.compiler.assume_constant_result
def _triton_chosen(device: torch.device, dtype: torch.dtype, layout: str) -> bool:
    """Whether the Triton path runs for inputs of this device, dtype and layout (decided once per path and key;
    under ``torch.compile``, when the graph is traced). A refusal warns once, saying why."""
    path = cuda_path()
    if path == "reference":
        return False
    key = (path, str(device), dtype, layout)
    if key not in _TRITON_REFUSALS:
        _TRITON_REFUSALS[key] = _self_check(device, dtype, layout) if path == "auto" else _import_refusal()
        if _TRITON_REFUSALS[key] is not None:
            _warn_once(key, f"IC blocks on {device} ({str(dtype).removeprefix('torch.')}, {layout}) run the "
                            f"reference BatchNorm and Dropout: {_TRITON_REFUSALS[key]}")
    return _TRITON_REFUSALS[key] is None


def _import_refusal() -> str | None:
    """Why the Triton kernels cannot be imported (``None`` where they can)."""
    global _kernels
    try:
        from . import triton_ic
    except ImportError as error:
        return f"the Triton kernels cannot be imported ({_one_line(error)})"
    _kernels = triton_ic
    return None


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_triton(device: torch.device | str, dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> str | None:
    """The self-check of ``"auto"``: ``None`` where the Triton path matches the reference on ``device`` for inputs
    of ``dtype`` in ``memory_format``, else why not (one line). Runs ahead of ``torch.compile`` too."""
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    return _self_check(torch.device(device), dtype, layout)


_CHECK_P = 0.25


@torch.compiler.disable
def _self_check(device: torch.device, dtype: torch.dtype, layout: str) -> str | None:
    """Run an IC block on the Triton path (both its kernels) and compare it with the reference for the same mask:
    forward values, input and parameter gradients, running statistics and the drop rate. ``None`` where all agree,
    else what failed (any exception included: import, compile, launch, a missing compiler)."""
    refusal = _import_refusal()
    if refusal is not None:
        return refusal
    try:
        with compat.forked_rng(device), torch.no_grad():
            return _compare_with_reference(device, dtype, layout)
    except Exception as error:  # noqa: BLE001 (any failure of the kernels means the reference)
        return f"the Triton self-check failed ({_one_line(error)})"


def _compare_with_reference(device: torch.device, dtype: torch.dtype, layout: str) -> str | None:
    features = 16
    numbers = torch.Generator(device).manual_seed(0)  # the inputs; only the seeds come from the default generator
    x = (torch.randn(8, features, 8, 8, device=device, generator=numbers) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    parameters_dtype = dtype if dtype == torch.float64 else torch.float32
    weight = torch.rand(features, device=device, dtype=parameters_dtype, generator=numbers) + 0.5
    bias = torch.randn(features, device=device, dtype=parameters_dtype, generator=numbers)
    running = [torch.zeros(features, device=device, dtype=parameters_dtype),
               torch.ones(features, device=device, dtype=parameters_dtype)]
    expected_running = [t.clone() for t in running]
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
        seed = _philox_seed(x)
        out, mean, var = _PhiloxBatchNormDropout.apply(*inputs, seed, _CHECK_P, 1e-5)
        _update_running_stats(RunningStats(*running, 0.1), mean, var, x)
        grad = torch.randn(out.shape, device=device, generator=numbers).to(out.dtype)
        compute = parameters_dtype
        got = torch.autograd.grad(out, inputs, grad)
        keep = (out != 0).to(compute)
        reference_inputs = [t.detach().to(compute).requires_grad_() for t in inputs]
        normalised = F.batch_norm(reference_inputs[0], *expected_running, *reference_inputs[1:], True, 0.1, 1e-5)
        expected = normalised * keep / (1 - _CHECK_P)
        want = torch.autograd.grad(expected, reference_inputs, grad.to(compute))
    low_precision = dtype in (torch.bfloat16, torch.float16)
    tolerance = {"atol": 5e-2, "rtol": 5e-2} if low_precision else {"atol": 1e-4, "rtol": 1e-4}
    checks = [("forward values", out, expected), ("input gradient", got[0], want[0]),
              ("weight gradient", got[1], want[1]), ("bias gradient", got[2], want[2]),
              ("running mean", running[0], expected_running[0]), ("running variance", running[1], expected_running[1])]
    for what, actual, wanted in checks:
        try:
            torch.testing.assert_close(actual.to(compute), wanted.to(compute), **tolerance)
        except AssertionError:
            return f"the Triton path's {what} differ from the reference"
    dropped = 1.0 - keep.mean().item()
    if abs(dropped - _CHECK_P) > 6 * math.sqrt(_CHECK_P * (1 - _CHECK_P) / keep.numel()):
        return f"the Triton path drops {dropped:.3f} of the elements, not p = {_CHECK_P}"
    if torch.equal(_PhiloxBatchNormDropout.apply(inputs[0], *inputs[1:], _philox_seed(x), _CHECK_P, 1e-5)[0] != 0,
                   keep.bool()):
        return "the Triton path draws the same mask for two seeds"
    return None


def _refuse_after_failure(x: torch.Tensor, error: Exception) -> None:
    """Record that the Triton path failed on ``x``'s device, dtype and layout under ``"auto"``, warning once."""
    key = ("auto", str(x.device), x.dtype, _layout(x) or "")
    _TRITON_REFUSALS[key] = f"the Triton kernels failed ({_one_line(error)})"
    _warn_once(key, f"IC blocks on {x.device} ({str(x.dtype).removeprefix('torch.')}) run the reference BatchNorm "
                    f"and Dropout from now on: {_TRITON_REFUSALS[key]}")


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a block computes its statistics and affine in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalise(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, running: RunningStats | None,
) -> tuple[torch.Tensor, BatchStats]:
    """``x`` normalised with its batch statistics and mapped by ``scale`` and ``shift``, and those statistics
    (in :func:`compute_dtype`); updates ``running`` (where given) as BatchNorm does.

    Row-reduction statistics where they pay off, then one eval-mode ``native_batch_norm``
    pass; else one training-mode ``native_batch_norm`` call, which computes the statistics,
    the output and the running update together (the fewest calls: small tensors pay per call).
    """
    if _row_stats_pay_off(x):
        mean, var = _row_stats(x)
        if running is not None:
            _update_running_stats(running, mean, var, x)
        out = torch.native_batch_norm(x, scale, shift, mean, var, False, 0.0, eps)[0]
        return out, BatchStats(mean, var, var.add(eps).rsqrt_())
    running_mean, running_var, momentum = (None, None, 0.0) if running is None else (
        running.mean, running.var, running.momentum)
    out, mean, invstd = torch.native_batch_norm(x, scale, shift, running_mean, running_var, True, momentum, eps)
    dtype = compute_dtype(x.dtype)
    mean, invstd = mean.to(dtype), invstd.to(dtype)
    return out, BatchStats(mean, invstd.pow(-2).sub_(eps).clamp_min_(0.0), invstd)


def _dropout_output(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, stats: BatchStats, dropped: torch.Tensor, eps: float,
) -> torch.Tensor:
    """The IC output on the positions path: ``x`` normalised with ``stats`` and mapped by ``scale`` and ``shift``
    (the affine over the keep probability) in one pass, the ``dropped`` positions zeroed. The same inputs give the
    same values."""
    dtype = compute_dtype(x.dtype)
    out = torch.native_batch_norm(x, scale.to(dtype), shift.to(dtype), stats.mean, stats.var, False, 0.0, eps)[0]
    _flat(out).index_fill_(0, dropped, 0.0)
    return out


def _forward_kernel(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, dropped: torch.Tensor,
    running: RunningStats | None = None,
) -> tuple[torch.Tensor, BatchStats]:
    """``(output, batch statistics)`` of the IC block in training mode on the positions path; updates ``running``.

    ``scale`` and ``shift`` are the BatchNorm affine divided by the keep probability ``1 - p``.
    """
    out, stats = _normalise(x, scale, shift, eps, running)
    _flat(out).index_fill_(0, dropped, 0.0)
    return out, stats


def _laid_out_like(grad: torch.Tensor, output: torch.Tensor, *, owned: bool) -> torch.Tensor:
    """``grad`` laid out like ``output`` (whose memory order a mask indexes): itself where it is and ``owned`` (no
    one else holds it, so it may change in place), else a copy."""
    if owned and grad.stride() == output.stride():
        return grad
    return torch.empty_like(output).copy_(grad)


def _backward_kernel(
    kept_grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    p: float, eps: float, needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients for ``x`` and the BatchNorm ``weight`` and bias (where ``needs`` says) of a block's output.

    ``kept_grad`` is the output's gradient with the dropped positions zeroed; ``mean`` and ``invstd`` are in
    :func:`compute_dtype`, and so is the scale given to the kernel (mixed types: a low-precision ``x`` with float32
    parameters, which both its CPU and CUDA kernels take). The parameter gradients come back in ``weight``'s dtype.
    """
    keep = 1.0 - p
    scale = torch.div(weight.to(mean.dtype), keep)
    grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
        kept_grad, x, scale, None, None, mean, invstd, True, eps, list(needs))
    return grad_x, _div(grad_scale, keep, weight.dtype), _div(grad_shift, keep, weight.dtype)


def _div(t: torch.Tensor | None, divisor: float, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else _to(t.div_(divisor), dtype)


def _scaled_affine(weight: torch.Tensor, bias: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The BatchNorm affine with the dropout scale ``1 / (1 - p)`` folded in."""
    keep = 1.0 - p
    return torch.div(weight, keep), torch.div(bias, keep)


def _draw_seed() -> int:
    """A seed for the positions, from the default generator (so ``torch.manual_seed`` applies)."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


def _positions(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The mask of a block on ``x`` on the positions path (:attr:`MaskKind.POSITIONS`)."""
    return dropped_positions(x.numel(), p, seed, x.device)


class _BatchNormDropout(torch.autograd.Function):
    """Eager autograd on the positions path: backward keeps the dropped positions (``8p`` bytes per element);
    forward updates the running statistics."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running: RunningStats,
                p: float, eps: float) -> torch.Tensor:
        dropped = _positions(x, p, _draw_seed())
        out, stats = _forward_kernel(x, *_scaled_affine(weight, bias, p), eps, dropped, running)
        ctx.save_for_backward(x, weight, stats.mean, stats.invstd, dropped)
        ctx.p, ctx.eps = p, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, dropped = ctx.saved_tensors
        kept_grad = _laid_out_like(grad, x, owned=False)  # the forward output was laid out like x
        _flat(kept_grad).index_fill_(0, dropped, 0.0)
        return *_backward_kernel(kept_grad, x, weight, mean, invstd, ctx.p, ctx.eps), None, None, None


# For torch.compile: custom operators, which it keeps whole (fake kernels give the shapes)
# instead of tracing into the data-dependent mask. Their outputs need static shapes, so
# backward gets the seed of the mask and draws the positions again.
@torch.library.custom_op("icrewrite::batch_norm_dropout", mutates_args=())
def _forward_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_forward_kernel` with the seed of its positions in place of the positions."""
    seed = _draw_seed()
    out, stats = _forward_kernel(x, *_scaled_affine(weight, bias, p), eps, _positions(x, p, seed))
    return out, stats.mean, stats.var, torch.tensor(seed)


def _empty_stats(x: torch.Tensor) -> torch.Tensor:
    """What a fake kernel returns for per-feature statistics of ``x``."""
    return x.new_empty(x.shape[1], dtype=compute_dtype(x.dtype))


@_forward_op.register_fake
def _(x, weight, bias, p, eps):
    return torch.empty_like(x), _empty_stats(x), _empty_stats(x), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("icrewrite::batch_norm_dropout_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    seed: torch.Tensor, p: float, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward_kernel`, drawing the positions again from ``seed``."""
    kept_grad = _laid_out_like(grad, x, owned=False)
    _flat(kept_grad).index_fill_(0, _positions(x, p, int(seed)), 0.0)
    return _backward_kernel(kept_grad, x, weight, mean, var.add(eps).rsqrt_(), p, eps)


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


# The Philox path (MaskKind.PHILOX): the Triton kernels, in autograd Functions that torch.compile traces (the kernels
# are torch.library.triton_op operators that Inductor sees; their shapes are static). The seed is a tensor drawn
# before the Function, by an op that is part of the graph under torch.compile.
_kernels: Any = None  # icrewrite.layers.triton_ic once imported (_import_refusal)


def _philox_seed(x: torch.Tensor) -> torch.Tensor:
    """A 0-d ``int64`` seed on ``x``'s device from its default generator (``torch.manual_seed`` applies; under
    ``torch.compile`` an op in the graph, so every CUDA-graph replay draws a new one)."""
    return torch.randint(2**62, (), device=x.device, dtype=torch.int64)


def _philox_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                   invstd: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """The IC output on the Philox path: the per-feature scale and shift (BatchNorm's affine, the batch statistics
    and the dropout scale in one, computed once per feature), then one kernel pass that applies them and drops."""
    keep = 1.0 - p
    scale = weight.to(mean.dtype) * invstd / keep
    shift = bias.to(mean.dtype) / keep - mean * scale
    return _kernels.normalise_dropout(x, scale, shift, seed, p)


def _philox_stats(x: torch.Tensor, eps: float) -> BatchStats:
    mean, invstd = _kernels.batch_stats(x, eps)
    return BatchStats(mean, invstd.pow(-2).sub(eps).clamp_min(0.0), invstd)


class _PhiloxBatchNormDropout(torch.autograd.Function):
    """The lone block on the Philox path: ``(output, batch mean, batch variance)``; backward keeps the input,
    per-feature statistics and the seed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, seed: torch.Tensor, p: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stats = _philox_stats(x, eps)
        out = _philox_output(x, weight, bias, stats.mean, stats.invstd, seed, p)
        ctx.mark_non_differentiable(stats.mean, stats.var)
        ctx.save_for_backward(x, weight, stats.mean, stats.invstd, seed)
        ctx.p, ctx.eps = p, eps
        return out, stats.mean, stats.var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd, seed = ctx.saved_tensors
        kept_grad = _kernels.drop(_laid_out_like(grad, x, owned=True), seed, ctx.p)
        grads = _backward_kernel(kept_grad, x, weight, mean, invstd, ctx.p, ctx.eps, tuple(ctx.needs_input_grad[:3]))
        return *grads, None, None, None


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


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """``t`` as autocast to ``dtype`` would give it to a layer (floating tensors other than float64 cast)."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives weight layers on ``x``'s device, ``None`` where autocast is off."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _layer_forward(call: LayerCall, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   amp: torch.dtype | None) -> torch.Tensor:
    """The layer on the IC output ``y``, in the autocast dtype ``amp`` where given (as autocast would run it)."""
    if amp is None:
        return call.forward(y, weight, bias)
    with torch.autocast(y.device.type, enabled=False):
        return call.forward(_cast(y, amp), _cast(weight, amp), _cast(bias, amp))


def _layer_backward(call: LayerCall, grad: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                    amp: torch.dtype | None, needs: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """Gradients for ``y``, ``weight`` and the bias of :func:`_layer_forward`, each in its tensor's dtype."""
    cast_y, cast_weight = _cast(y, amp), _cast(weight, amp)
    grad_y, grad_weight, grad_bias = call.backward(grad.to(cast_y.dtype), cast_y, cast_weight, has_bias, needs)
    return _to(grad_y, y.dtype), _to(grad_weight, weight.dtype), _to(grad_bias, weight.dtype)


def _to(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _layer_backward_kernel(
    grad: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, stats: BatchStats,
    dropped: torch.Tensor, weight: torch.Tensor, has_bias: bool, p: float, eps: float, call: LayerCall,
    amp: torch.dtype | None, needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for ``x``, the BatchNorm weight and bias, the layer's weight and bias (where ``needs`` says) of
    ``call`` on the positions path's output. Rebuilds the IC output from ``x`` (the same values up to rounding)
    instead of keeping it."""
    y = _dropout_output(x, *_scaled_affine(norm_weight, norm_bias, p), stats, dropped, eps)
    norm_needs = needs[:3]
    grad_y, grad_weight, grad_bias = _layer_backward(call, grad, y, weight, has_bias, amp,
                                                     (any(norm_needs), *needs[3:5]))
    norm_grads = (None, None, None)
    if any(norm_needs):
        kept_grad = _laid_out_like(grad_y, y, owned=True)
        _flat(kept_grad).index_fill_(0, dropped, 0.0)
        del y, grad_y  # one rebuilt output alive at a time
        norm_grads = _backward_kernel(kept_grad, x, norm_weight, stats.mean, stats.invstd, p, eps, norm_needs)
    return *norm_grads, grad_weight, grad_bias


class _NormDropoutLayer(torch.autograd.Function):
    """``call(Dropout(BatchNorm(x)))`` on the positions path; backward rebuilds the IC output from ``x`` instead of
    keeping it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, running: RunningStats, p: float, eps: float, call: LayerCall,
                amp: torch.dtype | None) -> torch.Tensor:
        dropped = _positions(x, p, _draw_seed())
        y, stats = _forward_kernel(x, *_scaled_affine(norm_weight, norm_bias, p), eps, dropped, running)
        ctx.save_for_backward(x, norm_weight, norm_bias, stats.mean, stats.var, stats.invstd, dropped, weight)
        ctx.p, ctx.eps, ctx.call, ctx.has_bias, ctx.amp = p, eps, call, bias is not None, amp
        return _layer_forward(call, y, weight, bias, amp)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, norm_weight, norm_bias, mean, var, invstd, dropped, weight = ctx.saved_tensors
        grads = _layer_backward_kernel(grad, x, norm_weight, norm_bias, BatchStats(mean, var, invstd), dropped, weight,
                                       ctx.has_bias, ctx.p, ctx.eps, ctx.call, ctx.amp, ctx.needs_input_grad[:5])
        return *grads, None, None, None, None, None


class _PhiloxNormDropoutLayer(torch.autograd.Function):
    """``call(Dropout(BatchNorm(x)))`` on the Philox path: ``(output, batch mean, batch variance)``; backward
    rebuilds the IC output from ``x``, the statistics and the seed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, seed: torch.Tensor, p: float, eps: float,
                call_args: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int],
                amp: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stats = _philox_stats(x, eps)
        y = _philox_output(x, norm_weight, norm_bias, stats.mean, stats.invstd, seed, p)
        out = _layer_forward(_call_of(*call_args), y, weight, bias, amp)
        ctx.mark_non_differentiable(stats.mean, stats.var)
        ctx.save_for_backward(x, norm_weight, norm_bias, stats.mean, stats.invstd, seed, weight)
        ctx.p, ctx.eps, ctx.call_args, ctx.has_bias, ctx.amp = p, eps, call_args, bias is not None, amp
        return out, stats.mean, stats.var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *unused: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, norm_weight, norm_bias, mean, invstd, seed, weight = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:5])
        y = _philox_output(x, norm_weight, norm_bias, mean, invstd, seed, ctx.p)
        grad_y, grad_weight, grad_bias = _layer_backward(_call_of(*ctx.call_args), grad, y, weight, ctx.has_bias,
                                                         ctx.amp, (any(needs[:3]), *needs[3:5]))
        norm_grads = (None, None, None)
        if any(needs[:3]):
            kept_grad = _kernels.drop(_laid_out_like(grad_y, y, owned=True), seed, ctx.p)
            norm_grads = _backward_kernel(kept_grad, x, norm_weight, mean, invstd, ctx.p, ctx.eps, needs[:3])
        return *norm_grads, grad_weight, grad_bias, None, None, None, None, None


# For torch.compile, the positions path as custom operators (like the lone block's above): the layer
# is described by its convolution arguments (empty for Linear), backward gets the seed.
def _call_of(stride: Any, padding: Any, dilation: Any, groups: int) -> LayerCall:
    """The layer that :func:`_call_args` described: a convolution, or ``Linear`` for an empty ``stride``."""
    return ConvCall(tuple(stride), tuple(padding), tuple(dilation), groups) if len(stride) else _LINEAR


def _call_args(call: LayerCall) -> tuple[list[int], list[int], list[int], int]:
    if isinstance(call, ConvCall):
        return list(call.stride), list(call.padding), list(call.dilation), call.groups
    return [], [], [], 1


@torch.library.custom_op("icrewrite::norm_dropout_layer", mutates_args=())
def _layer_forward_op(
    x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor | None, p: float, eps: float, stride: list[int], padding: list[int], dilation: list[int],
    groups: int, amp: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IC block (:func:`_forward_kernel`) then the layer, with the seed of its positions in place of them."""
    seed = _draw_seed()
    y, stats = _forward_kernel(x, *_scaled_affine(norm_weight, norm_bias, p), eps, _positions(x, p, seed))
    out = _layer_forward(_call_of(stride, padding, dilation, groups), y, weight, bias, amp)
    return out, stats.mean, stats.var, torch.tensor(seed)


@_layer_forward_op.register_fake
def _(x, norm_weight, norm_bias, weight, bias, p, eps, stride, padding, dilation, groups, amp):
    out = _layer_forward(_call_of(stride, padding, dilation, groups), torch.empty_like(x), weight, bias, amp)
    return out, _empty_stats(x), _empty_stats(x), torch.empty((), dtype=torch.int64)


@torch.library.custom_op("icrewrite::norm_dropout_layer_backward", mutates_args=())
def _layer_backward_op(
    grad: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, mean: torch.Tensor,
    var: torch.Tensor, seed: torch.Tensor, weight: torch.Tensor, has_bias: bool, p: float, eps: float,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, amp: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_layer_backward_kernel` for every input, drawing the positions again from ``seed``;
    the bias gradient is empty for a layer without bias."""
    stats = BatchStats(mean, var, var.add(eps).rsqrt_())
    grads = _layer_backward_kernel(grad, x, norm_weight, norm_bias, stats, _positions(x, p, int(seed)), weight,
                                   has_bias, p, eps, _call_of(stride, padding, dilation, groups), amp, (True,) * 5)
    return *grads[:4], grads[4] if has_bias else weight.new_empty(0)


@_layer_backward_op.register_fake
def _(grad, x, norm_weight, norm_bias, mean, var, seed, weight, has_bias, p, eps, stride, padding, dilation, groups,
      amp):
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
    return *grads, grad_bias if ctx.has_bias else None, None, None, None, None, None, None, None


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

    True in CPU training and in CUDA training where the CUDA path chooses the Triton kernels (:func:`cuda_path`,
    :func:`_uses_triton`), eager or compiled, for a plain affine BatchNorm that tracks running
    statistics (not SyncBatchNorm or another subclass with its own forward), an
    ``nn.Dropout`` with ``0 < p < 1``, more than one value per feature, and no hooks on
    either module.
    """
    return (
        norm.training and drop.training and not _exporting(x)
        and isinstance(norm, _BatchNorm) and type(norm).forward is _BatchNorm.forward
        and norm.affine and norm.track_running_stats
        and type(drop) is nn.Dropout and 0.0 < drop.p < 1.0
        and x.dim() >= 2 and x.numel() > x.shape[feature_dim]
        and not _hooked(norm) and not _hooked(drop)
        and (x.device.type == "cpu" or _uses_triton(x if feature_dim == 1 else x.flatten(0, -2))))


def layer_call(ic: nn.Module, layer: nn.Module, base: type[nn.Module], x: torch.Tensor) -> LayerCall | None:
    """How :func:`norm_dropout_layer` calls ``layer`` after its IC block ``ic``, or ``None`` where it does not fuse them.

    ``base`` is the layer's class before the IC swap: a plain ``Conv1d/2d/3d`` (zero padding
    given as sizes) or ``Linear`` fuses, subclasses with their own forward do not. None
    where hooks are registered on ``ic`` itself, which a fused call would skip, and for an
    input ``x`` that the block runs as native ops (small, see :func:`batch_norm_dropout`).
    Under autocast the fused call runs the layer in the autocast dtype. The IC's own fast
    path must apply too (:func:`applies`).
    """
    if _hooked(ic) or _runs_natively(x):
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


def _update_running_stats(running: RunningStats, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor) -> None:
    """BatchNorm's update of the running statistics from the statistics of batch ``x`` (unbiased variance, over
    its values per feature), in their own dtype."""
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        running.mean.lerp_(mean.to(running.mean.dtype), running.momentum)
        running.var.lerp_((var * (count / (count - 1))).to(running.var.dtype), running.momentum)


def _falls_back(x: torch.Tensor, error: Exception) -> bool:
    """Whether a failure of the Triton kernels on ``x`` gives way to the positions path: in eager mode under
    ``"auto"`` (recorded, with one warning); ``"triton"`` asked for the kernels whatever happens."""
    if torch.compiler.is_compiling() or cuda_path() != "auto":
        return False
    _refuse_after_failure(x, error)
    return True


def batch_norm_dropout(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, *, p: float, momentum: float = 0.1, eps: float = 1e-5,
) -> torch.Tensor:
    """Training-mode ``F.dropout(F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps), p)``.

    For ``x`` of shape ``(N, C, *)`` on CPU (or on CUDA where the CUDA path chooses the Triton kernels) and
    ``0 < p < 1``; updates the running statistics in place. Differentiable in ``x``, ``weight`` and ``bias``: once
    through the operators, as often as autograd allows for small inputs, which run as native ops.
    """
    running = RunningStats(running_mean, running_var, momentum)
    if _mask_kind(x) is MaskKind.PHILOX:
        out = _philox_or_fall_back(x, running, lambda: _PhiloxBatchNormDropout.apply(
            x, weight, bias, _philox_seed(x), p, eps))
        if out is not None:
            return out
    if _runs_natively(x):
        return _native_batch_norm_dropout(x, running_mean, running_var, weight, bias, p, momentum, eps)
    if not torch.compiler.is_compiling():
        return _BatchNormDropout.apply(x, weight, bias, running, p, eps)
    out, mean, var, _ = _forward_op(x, weight, bias, p, eps)
    _update_running_stats(running, mean, var, x)
    return out


def _philox_or_fall_back(x: torch.Tensor, running: RunningStats,
                         run: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """The Triton kernels' output, ``run()``, with the running statistics updated; None where they failed in a way
    that falls back to the other paths (see :func:`_falls_back`)."""
    try:
        out, mean, var = run()
    except Exception as error:
        if not _falls_back(x, error):
            raise
        return None
    _update_running_stats(running, mean, var, x)
    return out


def _runs_natively(x: torch.Tensor) -> bool:
    """Whether the block on ``x`` runs as native autograd ops (:func:`_native_batch_norm_dropout`): a small contiguous
    CPU tensor (``_NATIVE_NUMEL``) in eager mode that the Triton path does not take."""
    return (x.numel() <= _NATIVE_NUMEL and x.device.type == "cpu" and x.is_contiguous()
            and not torch.compiler.is_compiling() and not _uses_triton(x))


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
    (which the operation before keeps anyway), per-feature statistics and the mask (its
    positions, or the seed of the Triton kernels' mask). Under autocast the layer runs
    in the autocast dtype. Differentiable once.
    """
    running = RunningStats(norm.running_mean, norm.running_var, _count_batch(norm))
    amp = _autocast_dtype(x)
    if _mask_kind(x) is MaskKind.PHILOX:
        call_args = tuple(tuple(arg) if isinstance(arg, list) else arg for arg in _call_args(call))
        out = _philox_or_fall_back(x, running, lambda: _PhiloxNormDropoutLayer.apply(
            x, norm.weight, norm.bias, weight, bias, _philox_seed(x), p, norm.eps, call_args, amp))
        if out is not None:
            return out
    if not torch.compiler.is_compiling():
        return _NormDropoutLayer.apply(x, norm.weight, norm.bias, weight, bias, running, p, norm.eps, call, amp)
    out, mean, var, _ = _layer_forward_op(x, norm.weight, norm.bias, weight, bias, p, norm.eps, *_call_args(call), amp)
    _update_running_stats(running, mean, var, x)
    return out
