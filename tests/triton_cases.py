"""The Triton kernels of the IC block (icrewrite.layers.triton_ic) against the reference BatchNorm + Dropout.

Not collected by the default run: tests/test_triton_ic.py runs this module in a fresh process, on CPU tensors
under ``TRITON_INTERPRET=1`` (which must be set before Triton is imported), and on CUDA where there is a GPU.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from icrewrite.layers import fast as fast_ic
from icrewrite.layers import triton_ic
from test_fast_ic import CASES, LAYERS, P, check_against_reference, check_fused_against_reference, ic_pair, with_ic

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
# The interpreter runs each kernel instance in Python: a few of the smaller cases keep this module to seconds.
SMALL_CASES = ["conv-small", "conv1d", "tokens", "linear"]
SMALL_LAYERS = ["conv2d 1x1 strided, no bias", "conv2d grouped, dilated", "linear on tokens"]


@pytest.fixture(autouse=True)
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA tensors take the Triton path as they are; interpreted, CPU tensors are sent down it too (small ones
    included, which on CPU run as native ops)."""
    if INTERPRETED:
        monkeypatch.setattr(fast_ic, "_uses_triton", lambda x: triton_ic.feature_stride(x) is not None)
        monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", -1)
    elif not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("case", SMALL_CASES)
def test_block_matches_reference_for_the_same_mask(case):
    shape, feature_dim = CASES[case]
    fast, reference = (block.to(DEVICE) for block in ic_pair(shape[1] if feature_dim == 1 else shape[-1], feature_dim))
    check_against_reference(fast, reference, torch.randn(shape, dtype=torch.float64, device=DEVICE) * 3 + 2)


def test_channels_last_keeps_its_layout():
    fast, reference = (block.to(DEVICE) for block in ic_pair(6))
    x = (torch.randn(4, 6, 5, 5, dtype=torch.float64, device=DEVICE) + 1).contiguous(memory_format=torch.channels_last)
    assert check_against_reference(fast, reference, x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", SMALL_LAYERS)
def test_fused_layer_matches_reference_for_the_same_mask(case):
    make_layer, shape = LAYERS[case]
    layer = with_ic(make_layer(), torch.float64).to(DEVICE)
    check_fused_against_reference(layer, torch.randn(shape, dtype=torch.float64, device=DEVICE) * 3 + 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_the_float32_reference(dtype):
    """What a block gets under autocast: a bf16/fp16 input, float32 parameters and statistics."""
    fast, reference = (block.to(DEVICE) for block in ic_pair(8, dtype=torch.float32))
    x = (torch.randn(6, 8, 5, 5, device=DEVICE) + 1).to(dtype).requires_grad_()
    y = fast(x)
    keep = (y != 0).float()
    x_reference = x.detach().float().requires_grad_()
    expected = reference.norm(x_reference) * keep / (1 - P)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    grad = torch.randn_like(expected)
    y.backward(grad.to(dtype))
    expected.backward(grad)
    torch.testing.assert_close(x.grad.float(), x_reference.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(fast.norm.weight.grad, reference.norm.weight.grad, atol=0.05, rtol=0.02)
    torch.testing.assert_close(fast.norm.running_var, reference.norm.running_var, rtol=1e-2, atol=1e-3)


def test_backward_keeps_the_input_statistics_and_seed_only():
    """No mask and no output: every saved tensor is the input or of the block's width (the seed is 0-d)."""
    fast, _ = (block.to(DEVICE) for block in ic_pair(4, dtype=torch.float32))
    x = torch.randn(6, 4, 5, 5, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast(x)
    assert any(t is x for t in saved)
    assert all(t is x or t.numel() <= 4 for t in saved)
    assert any(t.dim() == 0 and t.dtype == torch.int64 for t in saved)


def test_drop_rate_is_p_and_the_mask_follows_the_seed():
    x = torch.randn(64, 4, 16, 16, device=DEVICE)
    mean, invstd = triton_ic.batch_stats(x, 1e-5)
    ones, zeros = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    first, again, other = (triton_ic.normalise_dropout(x, mean, invstd, ones, zeros, P, seed) for seed in (1, 1, 2))
    dropped = (first == 0).float().mean().item()
    assert abs(dropped - P) < 5 * (P * (1 - P) / x.numel()) ** 0.5
    assert torch.equal(first, again) and not torch.equal(first == 0, other == 0)
    torch.testing.assert_close(triton_ic.drop(torch.ones_like(x), P, 1) == 0, first == 0)


@pytest.mark.skipif(INTERPRETED, reason="compiling takes minutes on CPU; run on CUDA")
def test_compiled_matches_eager():
    layer = with_ic(nn.Conv2d(8, 4, 3, padding=1)).to(DEVICE)
    x = torch.randn(4, 8, 6, 6, device=DEVICE)
    outputs = []
    for run in (layer, torch.compile(layer)):
        torch.manual_seed(0)
        outputs.append(run(x))
    torch.testing.assert_close(outputs[0], outputs[1])
