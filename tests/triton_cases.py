"""The Triton kernels of the IC block (icrewrite.layers.triton_ic) against the reference BatchNorm + Dropout.

Not collected by the default run: tests/test_triton_ic.py runs this module in a fresh process, on CPU tensors
under ``TRITON_INTERPRET=1`` (which must be set before Triton is imported), and on CUDA where there is a GPU.
"""
from __future__ import annotations

import copy
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
def triton_path(monkeypatch: pytest.MonkeyPatch):
    """The CUDA path set to the Triton kernels; interpreted, CPU tensors are sent down it too (small ones
    included, which on CPU run as native ops)."""
    if INTERPRETED:
        monkeypatch.setattr(fast_ic, "_TRITON_DEVICES", frozenset({"cpu", "cuda"}))
    elif not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    fast_ic.set_cuda_path("triton")
    yield
    fast_ic.set_cuda_path(None)


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


def seed(value: int) -> torch.Tensor:
    return torch.tensor(value, device=DEVICE)


def test_drop_rate_is_p_and_the_mask_follows_the_seed():
    x = torch.randn(64, 4, 16, 16, device=DEVICE) + 3  # no element is 0
    ones, zeros = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
    first, again, other = (triton_ic.normalise_dropout(x, ones, zeros, seed(value), P) for value in (1, 1, 2))
    dropped = (first == 0).float().mean().item()
    assert abs(dropped - P) < 5 * (P * (1 - P) / x.numel()) ** 0.5
    assert torch.equal(first, again) and not torch.equal(first == 0, other == 0)
    torch.testing.assert_close(triton_ic.drop(torch.ones_like(x), seed(1), P) == 0, first == 0)
    # Four uniforms per Philox call: each quarter of a program's elements drops at the rate p on its own.
    quarters = (first == 0).float().view(-1, 4, triton_ic._QUARTER).mean((0, 2))
    assert ((quarters - P).abs() < 5 * (P * (1 - P) / (x.numel() / 4)) ** 0.5).all(), quarters
    # Seeds that differ only in their high 32 bits draw other masks too.
    high = triton_ic.normalise_dropout(x, ones, zeros, seed(1 + 2**40), P)
    assert not torch.equal(high == 0, first == 0)


def test_empty_tensors_launch_nothing():
    for x in (torch.empty(0, 4, 3, 3, device=DEVICE), torch.empty(0, 4, device=DEVICE)):
        ones, zeros = torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE)
        assert triton_ic.normalise_dropout(x, ones, zeros, seed(1), P).shape == x.shape
        assert triton_ic.drop(x, seed(1), P).shape == x.shape
    fast, _ = (block.to(DEVICE) for block in ic_pair(4, dtype=torch.float32))
    assert fast(torch.empty(0, 4, 5, 5, device=DEVICE, requires_grad=True)).shape == (0, 4, 5, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_without_autocast(dtype):
    """A model cast to bf16/fp16 ("bf16-true"): input, parameters and running statistics all in that dtype. The
    statistics are computed in float32 and the running ones updated in their own dtype. Tolerances allow for the
    interpreter, which rounds to bf16 by truncation (compiled kernels round to nearest even)."""
    fast, reference = (block.to(DEVICE) for block in ic_pair(8, dtype=torch.float32))
    fast = fast.to(dtype)
    x = (torch.randn(6, 8, 5, 5, device=DEVICE) * 2 + 1).to(dtype).requires_grad_()
    y = fast(x)
    assert y.dtype == dtype and fast.norm.running_mean.dtype == dtype
    keep = (y != 0).float()
    x_reference = x.detach().float().requires_grad_()
    expected = reference.norm(x_reference) * keep / (1 - P)
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    grad = torch.randn_like(expected)
    y.backward(grad.to(dtype))
    expected.backward(grad)
    assert fast.norm.weight.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), x_reference.grad, atol=0.05, rtol=0.05)
    torch.testing.assert_close(fast.norm.weight.grad.float(), reference.norm.weight.grad, atol=0.05, rtol=0.02)
    torch.testing.assert_close(fast.norm.running_var.float(), reference.norm.running_var, rtol=2e-2, atol=1e-2)


def test_fused_layer_with_low_precision_parameters():
    layer = with_ic(nn.Conv2d(8, 4, 3, padding=1)).to(DEVICE).to(torch.bfloat16)
    x = torch.randn(4, 8, 6, 6, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    assert layer._fused_call(x) is not None
    out = layer(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad).all() for t in (x, layer.weight, layer.ic.norm.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_self_check_passes_and_auto_takes_the_triton_path(dtype, memory_format):
    assert fast_ic.check_triton(DEVICE, dtype, memory_format) is None
    fast_ic.set_cuda_path("auto")
    x = torch.randn(4, 6, 5, 5, device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)
    assert fast_ic._uses_triton(x)
    fast, _ = (block.to(DEVICE) for block in ic_pair(6, dtype=torch.float32))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fast(x.requires_grad_())
    assert any(t.dim() == 0 and t.dtype == torch.int64 and t.device == x.device for t in saved)  # the Philox seed


def test_the_self_check_leaves_the_generators_as_they_were():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert fast_ic.check_triton(DEVICE) is None
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.skipif(INTERPRETED, reason="interpreted kernels are not traceable (wrap_triton); run on CUDA")
@pytest.mark.parametrize("fused", [False, True])
def test_compiled_in_one_graph_matches_eager(fused):
    """torch.compile (Inductor) takes the block whole, kernels and seed in the graph, and computes what eager does
    (with Inductor drawing random numbers as eager torch does: its own generator gives other seeds)."""
    import torch._inductor.config

    torch._dynamo.reset()
    module = with_ic(nn.Conv2d(8, 4, 3, padding=1)) if fused else ic_pair(8, dtype=torch.float32)[0]
    module = module.to(DEVICE)
    x = torch.randn(4, 8, 6, 6, device=DEVICE)
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    outputs, grads = [], []
    for run in (module, compiled):
        torch.manual_seed(0)
        x_run = x.clone().requires_grad_()
        with torch._inductor.config.patch(fallback_random=True):
            out = run(x_run)
        out.sum().backward()
        outputs.append(out)
        grads.append(x_run.grad)
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.skipif(INTERPRETED, reason="CUDA graphs need CUDA")
def test_cuda_graph_replays_draw_new_masks():
    """Under mode="reduce-overhead" (CUDA graphs) every replay draws its own mask: the seed comes from the graph."""
    torch._dynamo.reset()
    block = ic_pair(8, dtype=torch.float32)[0].to(DEVICE)
    compiled = torch.compile(block, mode="reduce-overhead")
    x = torch.randn(4, 8, 6, 6, device=DEVICE) + 3
    masks = []
    for _ in range(4):
        with torch.no_grad():
            masks.append((compiled(x) == 0).clone())
    assert all(not torch.equal(masks[i], masks[i + 1]) for i in range(len(masks) - 1))
