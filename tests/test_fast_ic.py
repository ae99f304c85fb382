"""The fast IC training path (icrewrite.layers.fast) against the reference BatchNorm + Dropout modules."""
from __future__ import annotations

import copy
import importlib.util
import io
import math
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from timm.layers import StdConv2d
from torch import nn
from torch.utils.checkpoint import checkpoint

import icrewrite
from icrewrite.layers import fast as fast_ic
from icrewrite.layers import IC, ICBatchNorm, attach_ic, ic_base
from icrewrite.registry import weight_layer_features
from icrewrite.testing import randomize_norms

P = 0.3  # large enough that a wrong mask shows in every comparison
NATIVE_NUMEL = fast_ic._NATIVE_NUMEL  # the threshold the package ships with (the fixtures below change it)


@pytest.fixture(autouse=True)
def operators(monkeypatch):
    """The tests' inputs are small: unless a test asks for ``path``, they run the operators (autograd Functions and
    custom ops) that larger inputs run, not the native ops of small ones."""
    monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", -1)


@pytest.fixture(params=["operators", "native ops"])
def path(request, monkeypatch):
    """Both ways a CPU block trains: the operators, and the native autograd ops of small contiguous inputs."""
    if request.param == "native ops":
        monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", 2**62)
    return request.param


def ic_pair(features: int, feature_dim: int = 1, momentum: float | None = 0.1,
            dtype: torch.dtype = torch.float64) -> tuple[IC, IC]:
    """Two IC blocks with the same randomised state: the fast one and the reference one."""
    fast = randomize_norms(IC(features, P, feature_dim=feature_dim, momentum=momentum), seed=1).to(dtype)
    reference = copy.deepcopy(fast)
    reference.fast = False
    return fast.train(), reference.train()


def reference_output(reference: IC, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``Dropout(BatchNorm(x))`` by the reference modules, with the dropout mask ``keep`` (shaped like ``x``)."""
    features = x if reference.feature_dim == 1 else x.flatten(0, -2)
    return reference.norm(features).reshape(x.shape) * keep / (1 - P)


def check_against_reference(fast: IC, reference: IC, x: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Train-mode steps through both blocks with the same mask; values, gradients and statistics must agree."""
    features = x if fast.feature_dim == 1 else x.flatten(0, -2)
    assert fast_ic.applies(fast.norm, fast.drop, features) and not reference.fast
    for step in range(steps):
        x_step = (x * (1 + step)).detach().requires_grad_()
        y = fast(x_step)
        keep = (y != 0).to(y.dtype)  # the dropped elements: a kept one is never exactly 0 on continuous data
        expected = reference_output(reference, x_step, keep)
        torch.testing.assert_close(y, expected)
        assert abs(1 - keep.mean().item() - P) < 5 * math.sqrt(P * (1 - P) / keep.numel())
        grad = torch.randn_like(y)
        inputs = [x_step, fast.norm.weight, fast.norm.bias]
        reference_inputs = [x_step, reference.norm.weight, reference.norm.bias]
        for got, want in zip(torch.autograd.grad(y, inputs, grad), torch.autograd.grad(expected, reference_inputs, grad)):
            torch.testing.assert_close(got, want)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast.norm, name), getattr(reference.norm, name))
    return y


CASES = {
    "conv-row-stats": ((4, 16, 32, 32), 1),   # >= 2**16 elements: the row-reduction statistics
    "conv-small": ((6, 5, 4, 4), 1),          # native_batch_norm statistics
    "conv1d": ((6, 5, 7), 1),
    "conv3d": ((3, 4, 3, 3, 2), 1),
    "tokens": ((3, 7, 5), -1),                # Linear input (B, N, C)
    "linear": ((9, 5), -1),
}


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", CASES)
def test_fast_path_matches_reference_for_the_same_mask(case, momentum, path):
    shape, feature_dim = CASES[case]
    fast, reference = ic_pair(shape[1] if feature_dim == 1 else shape[-1], feature_dim, momentum)
    check_against_reference(fast, reference, torch.randn(shape, dtype=torch.float64) * 3 + 2)


def test_row_statistics_match_on_small_shapes(monkeypatch):
    monkeypatch.setattr(fast_ic, "_MIN_NUMEL", 0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 + 2
    assert fast_ic._row_stats_pay_off(x)
    check_against_reference(*ic_pair(4), x)


def test_channels_last_keeps_its_layout():
    fast, reference = ic_pair(6)
    x = (torch.randn(4, 6, 5, 5, dtype=torch.float64) + 1).contiguous(memory_format=torch.channels_last)
    y = check_against_reference(fast, reference, x)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("offset", [0.0, 1.0, 5.0])  # mean^2 / var about 0.5, 1.6 (one pass) and 26 (two passes)
def test_row_statistics_are_accurate_in_float32(offset):
    x = torch.relu(torch.randn(8, 16, 24, 24) + offset)  # what an IC block gets: post-ReLU activations
    assert fast_ic._row_stats_pay_off(x)
    mean, var = fast_ic._row_stats(x)
    torch.testing.assert_close(mean.double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x.double().var((0, 2, 3), unbiased=False), rtol=1e-6, atol=0)


def test_statistics_stay_accurate_for_a_large_offset():
    """Two-pass statistics: a feature of mean 1000 and std 0.01 in float32 keeps its variance."""
    fast, reference = ic_pair(16, dtype=torch.float32)
    x = 1000 + 0.01 * torch.randn(4, 16, 32, 32)
    assert fast_ic._row_stats_pay_off(x)
    fast(x)
    reference(x)
    torch.testing.assert_close(fast.norm.running_var, reference.norm.running_var, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("statistics", ["native ops", "native_batch_norm", "row reductions"])
def test_gradcheck_float64(monkeypatch, statistics):
    if statistics == "native ops":
        monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", 2**62)
    if statistics == "row reductions":
        monkeypatch.setattr(fast_ic, "_MIN_NUMEL", 0)
    x = torch.randn(3, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True) + 0.5
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert fast_ic._row_stats_pay_off(x) == (statistics == "row reductions")

    def fixed_mask(x, weight, bias):
        torch.manual_seed(0)  # the same mask on every evaluation
        return fast_ic.batch_norm_dropout(x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                          weight, bias, p=P)

    assert torch.autograd.gradcheck(fixed_mask, (x, weight, bias))
    if statistics == "native ops":  # native autograd ops: differentiable twice
        assert torch.autograd.gradgradcheck(fixed_mask, (x, weight, bias))


def test_small_inputs_run_as_native_ops_with_the_operators_mask(monkeypatch):
    """Up to the size threshold a block runs as native ops and its layer on its own; above it, the fused operator.
    Both draw the same mask from the same seed, so the same values, gradients and statistics come out."""
    monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", NATIVE_NUMEL)
    layer = with_ic(nn.Conv2d(8, 4, 3, padding=1), torch.float64)
    small = torch.randn(4, 8, 6, 6, dtype=torch.float64)

    def fused(batch: int) -> bool:
        return layer._fused_call(torch.empty(batch, 8, 4, 4, dtype=torch.float64)) is not None

    assert not fused(NATIVE_NUMEL // (8 * 16)) and fused(NATIVE_NUMEL // (8 * 16) + 1)
    assert layer._fused_call(small.transpose(2, 3)) is not None  # not contiguous: the operators
    x = small.clone().requires_grad_()
    double_backward = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)[0]
    assert double_backward.requires_grad  # native ops: differentiable twice; the operators are once_differentiable

    def run(threshold: int) -> list[torch.Tensor]:
        monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", threshold)
        block = copy.deepcopy(layer)
        x = small.clone().requires_grad_()
        torch.manual_seed(5)  # the same seed, so the same mask
        out = block(x)
        out.backward(torch.ones_like(out))
        assert x.grad is not None
        return [out, x.grad, *(p.grad for p in block.parameters()), block.ic.norm.running_var]

    for native, operator in zip(run(2**62), run(-1), strict=True):
        torch.testing.assert_close(native, operator)


def test_dropped_positions_are_a_bernoulli_process():
    numel, p = 400_000, 0.05
    dropped = fast_ic.dropped_positions(numel, p, seed=0)
    assert torch.equal(dropped, fast_ic.dropped_positions(numel, p, seed=0))
    assert not torch.equal(dropped[:100], fast_ic.dropped_positions(numel, p, seed=1)[:100])
    assert dropped.dtype == torch.int64
    assert torch.all(dropped[1:] > dropped[:-1]) and dropped[0] >= 0 and dropped[-1] < numel
    sigma = math.sqrt(numel * p * (1 - p))
    assert abs(dropped.numel() - numel * p) < 5 * sigma
    halves = torch.bincount((dropped >= numel // 2).long(), minlength=2)
    assert abs(halves[0] - halves[1]) < 5 * sigma                                # no drift along the tensor
    gaps = torch.diff(dropped).double()
    assert abs(gaps.mean().item() - 1 / p) < 0.05 / p                           # geometric gaps: mean 1/p
    assert abs((gaps == 1).double().mean().item() - p) < 5 * math.sqrt(p / gaps.numel())  # P(gap = 1) = p


@pytest.mark.parametrize("numel,p", [(1, 0.5), (7, 0.9), (1000, 0.01)])
def test_dropped_positions_small_and_extreme(numel, p):
    counts = torch.zeros(numel)
    trials = 2000
    for seed in range(trials):
        counts[fast_ic.dropped_positions(numel, p, seed)] += 1
    rate = counts.sum().item() / (numel * trials)
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / (numel * trials))


def test_eval_mode_is_the_affine_map_and_leaves_statistics():
    ic = randomize_norms(IC(5, P), seed=2).eval()
    before = {k: v.clone() for k, v in ic.state_dict().items()}
    x = torch.randn(4, 5, 3, 3)
    scale, shift = ic.affine()
    torch.testing.assert_close(ic(x), x * scale.view(5, 1, 1) + shift.view(5, 1, 1))
    for k, v in ic.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_reference(dtype, path):
    fast, reference = ic_pair(16, dtype=torch.float32)
    x = torch.randn(4, 16, 32, 32) + 1
    with torch.autocast("cpu", dtype=dtype):
        x = x.to(dtype).requires_grad_()  # what a convolution hands on under autocast
        assert fast_ic.applies(fast.norm, fast.drop, x)
        y = fast(x)
        expected = reference_output(reference, x, (y != 0).to(y.dtype))
    assert y.dtype == dtype and fast.norm.running_mean.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=0.05, rtol=0.02)
    y.float().square().sum().backward()
    assert x.grad is not None and fast.norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fast.norm.running_var, reference.norm.running_var, rtol=1e-2, atol=1e-3)


def test_fast_path_is_skipped_where_it_does_not_apply():
    ic = IC(4, P).train()
    x = torch.randn(8, 4, 3, 3)
    assert fast_ic.applies(ic.norm, ic.drop, x)
    assert not fast_ic.applies(ic.norm, ic.drop, torch.randn(1, 4))   # one value per feature: no batch statistics
    assert not fast_ic.applies(ic.norm, ic.drop.eval(), x)
    assert not fast_ic.applies(ic.norm, nn.Dropout(0.0).train(), x)
    handle = ic.norm.register_forward_hook(lambda *args: None)
    assert not fast_ic.applies(ic.norm, ic.drop.train(), x)
    handle.remove()


@pytest.mark.parametrize("strict", [False, True])
def test_fast_path_applies_under_compile_but_not_under_export(strict):
    """torch.compile keeps the fast path; torch.export records the reference ops. (On torch 2.11 Dynamo traces
    torch.compiler.is_exporting() as True under torch.compile too: icrewrite.compat.is_exporting.)"""
    ic = IC(4, P).train()
    x = torch.randn(8, 4, 3, 3)

    class Probe(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t + (1.0 if fast_ic.applies(ic.norm, ic.drop, t) else -1.0)

    torch.testing.assert_close(torch.compile(Probe(), backend="eager", fullgraph=True)(x), x + 1)
    torch.testing.assert_close(torch.export.export(Probe(), (x,), strict=strict).module()(x), x - 1)


# --- the IC block fused with its weight layer (ICWeightLayer in CPU training) -----------

LAYERS = {
    "conv2d 3x3, row statistics": (lambda: nn.Conv2d(16, 4, 3, padding=1), (4, 16, 32, 32)),
    "conv2d 1x1 strided, no bias": (lambda: nn.Conv2d(5, 4, 1, stride=2, bias=False), (6, 5, 5, 5)),
    "conv2d grouped, dilated": (lambda: nn.Conv2d(6, 4, 3, padding=2, dilation=2, groups=2), (3, 6, 7, 6)),
    "conv1d": (lambda: nn.Conv1d(5, 3, 3), (6, 5, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 2, 2), (3, 4, 3, 3, 2)),
    "linear": (lambda: nn.Linear(5, 3), (9, 5)),
    "linear on tokens": (lambda: nn.Linear(5, 3), (3, 7, 5)),
}


def with_ic(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``layer`` with a randomised IC block, in training mode."""
    features, feature_dim = weight_layer_features(layer)
    return randomize_norms(attach_ic(layer, IC(features, P, feature_dim=feature_dim)), seed=1).to(dtype).train()


def check_fused_against_reference(fused: nn.Module, x: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Train-mode steps through ``fused`` and the reference modules with the same mask: values, gradients and statistics agree."""
    reference = copy.deepcopy(fused)
    reference.ic.fast = False
    assert fused._fused_call(x) is not None and reference._fused_call(x) is None
    for step in range(steps):
        x_step = (x * (1 + step)).detach().requires_grad_()
        mask_probe = copy.deepcopy(fused.ic)  # the IC block on its own draws the same mask from the same seed
        torch.manual_seed(step)
        out = fused(x_step)
        torch.manual_seed(step)
        keep = (mask_probe(x_step) != 0).to(x.dtype)
        expected = ic_base(type(reference)).forward(reference, reference_output(reference.ic, x_step, keep))
        torch.testing.assert_close(out, expected)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [x_step, *fused.parameters()], grad)
        want = torch.autograd.grad(expected, [x_step, *reference.parameters()], grad)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.ic.norm, name), getattr(reference.ic.norm, name))
    return out


@pytest.mark.parametrize("case", LAYERS)
def test_fused_layer_matches_reference_for_the_same_mask(case):
    make_layer, shape = LAYERS[case]
    check_fused_against_reference(with_ic(make_layer(), torch.float64), torch.randn(shape, dtype=torch.float64) * 3 + 2)


def test_fused_layer_keeps_channels_last():
    x = (torch.randn(4, 6, 5, 5, dtype=torch.float64) + 1).contiguous(memory_format=torch.channels_last)
    out = check_fused_against_reference(with_ic(nn.Conv2d(6, 4, 3, padding=1), torch.float64), x)
    assert out.is_contiguous(memory_format=torch.channels_last)


def saved_storages(module: nn.Module, x: torch.Tensor) -> dict[int, int]:
    """Bytes of each storage that autograd keeps for the backward of ``module(x)``, by address."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return saved


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_layer_keeps_no_copy_of_the_ic_output(compiled):
    layer = attach_ic(nn.Conv2d(16, 8, 3, padding=1), IC(16, p=0.05)).train()  # dropped positions: 8p bytes per element
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    saved = saved_storages(torch.compile(layer) if compiled else layer, x)  # compiled: the seed, not the positions
    assert {ptr for ptr, size in saved.items() if size >= x.nbytes // 4} == {x.untyped_storage().data_ptr()}
    assert sum(saved.values()) < 1.2 * x.nbytes  # x (kept by the layer before anyway), the dropped positions, weights
    if not compiled:
        layer.ic.register_forward_hook(lambda *args: None)  # a hook on the IC block: it runs on its own
        assert len([size for size in saved_storages(layer, x).values() if size >= x.nbytes // 4]) == 2  # x, output


def test_fused_layer_under_checkpointing_and_offloading():
    """Outer saved-tensor hooks see what the fused operator keeps; recomputation draws the same mask."""
    layer = with_ic(nn.Conv2d(6, 4, 3, padding=1))
    x = torch.randn(4, 6, 8, 8)

    def gradients(run) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x_run = x.clone().requires_grad_()
        torch.manual_seed(0)
        run(x_run).square().sum().backward()
        return [x_run.grad, *(p.grad for p in layer.parameters())]

    def offloaded(t: torch.Tensor) -> torch.Tensor:
        with torch.autograd.graph.save_on_cpu():
            return layer(t)

    expected = gradients(layer)
    for run in (lambda t: checkpoint(layer, t, use_reentrant=False), offloaded):
        for got, want in zip(gradients(run), expected, strict=True):
            torch.testing.assert_close(got, want)


def test_fused_gradcheck_float64():
    layer = with_ic(nn.Conv2d(3, 2, 3, padding=1, stride=2), torch.float64)
    names = ("weight", "bias", "ic.norm.weight", "ic.norm.bias")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert layer._fused_call(x) is not None

    def fixed_mask(x, *params):
        torch.manual_seed(0)  # the same mask on every evaluation
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    params = [layer.get_parameter(name).detach().clone().requires_grad_() for name in names]
    assert torch.autograd.gradcheck(fixed_mask, (x, *params))


def test_fused_path_is_skipped_where_it_does_not_apply():
    x = torch.randn(4, 6, 8, 8)
    conv = with_ic(nn.Conv2d(6, 4, 3))
    assert conv._fused_call(x) is not None
    for layer in (StdConv2d(6, 4, 3), nn.Conv2d(6, 4, 3, padding_mode="reflect"), nn.Conv2d(6, 4, 4, padding="same"),
                  nn.ConvTranspose2d(6, 4, 3)):
        assert with_ic(layer)._fused_call(x) is None, layer
    handle = conv.ic.register_forward_pre_hook(lambda *args: None)
    assert conv._fused_call(x) is None
    handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_under_autocast_matches_the_unfused_block(dtype, bias):
    """Under autocast the fused operator runs the layer in the autocast dtype, as the unfused block then the
    autocast layer do (a hook on the IC block keeps it unfused; its lone fast path draws the same mask)."""
    fused = with_ic(nn.Conv2d(6, 4, 3, bias=bias))
    unfused = copy.deepcopy(fused)
    unfused.ic.register_forward_pre_hook(lambda *args: None)
    x = torch.randn(4, 6, 8, 8) * 2 + 1
    outputs, grads = [], []
    for layer in (fused, unfused):
        x_layer = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            assert (layer._fused_call(x_layer) is None) == (layer is unfused)
            torch.manual_seed(0)
            out = layer(x_layer)
        outputs.append(out)
        grads.append(torch.autograd.grad(out, [x_layer, *layer.parameters()], torch.ones_like(out)))
    assert outputs[0].dtype == dtype
    torch.testing.assert_close(outputs[0], outputs[1])
    for got, want in zip(*grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.ic.norm, name), getattr(unfused.ic.norm, name))


def small_converted() -> nn.Module:
    """conv-relu-IC-conv-relu-flatten-IC-linear, built by hand."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    for layer in (model[2], model[5]):
        features, feature_dim = weight_layer_features(layer)
        attach_ic(layer, IC(features, P, feature_dim=feature_dim))
    return randomize_norms(model, seed=0).train()


def test_sync_batchnorm_conversion_falls_back_to_the_reference():
    model = small_converted()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert isinstance(synced[2].ic.norm, nn.SyncBatchNorm) and not isinstance(synced[2].ic.norm, ICBatchNorm)
    reference = copy.deepcopy(model)
    for block in reference.modules():
        if isinstance(block, IC):
            block.fast = False
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    got = synced(x)
    torch.manual_seed(0)
    torch.testing.assert_close(got, reference(x))  # same RNG draws: the reference Dropout ran


def test_fx_traces_the_reference_modules():
    traced = torch.fx.symbolic_trace(small_converted())
    targets = {node.target for node in traced.graph.nodes}
    assert "2.ic.drop" in targets and "5.ic.drop" in targets
    traced(torch.randn(4, 3, 8, 8)).sum().backward()


def test_pickle_and_deepcopy_keep_the_fast_path_and_its_switch():
    model = small_converted()
    model[5].ic.fast = False
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied[2].ic.fast and not copied[5].ic.fast
        x = torch.randn(4, 3, 8, 8)
        torch.manual_seed(0)
        got = copied(x)
        torch.manual_seed(0)
        torch.testing.assert_close(got, model(x))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert not torch.load(buffer, weights_only=False)[5].ic.fast


def test_ddp_trains_through_the_fast_path(tmp_path, path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = small_converted()
        plain = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(4, 3, 8, 8)
        for net in (ddp, plain):
            torch.manual_seed(0)
            net(x).square().sum().backward()
        for a, b in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad)
    finally:
        dist.destroy_process_group()


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss.detach()


def test_compile_keeps_the_fast_path_in_one_graph(path):
    """Compiled, the blocks are custom operators; eager, the operators or native ops: the same masks either way."""
    model = small_converted()
    explanation = torch._dynamo.explain(copy.deepcopy(model))(torch.randn(4, 3, 8, 8))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert explanation.graphs[0].code.count("icrewrite.norm_dropout_layer") == 2  # each block fused with its layer
    compiled = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    expected = train_step(model, x)
    torch.manual_seed(0)
    torch.testing.assert_close(train_step(torch.compile(compiled), x), expected)  # same masks: the fast path ran
    for a, b in zip(model.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_compiled_fused_layer_matches_eager(bias, path):
    layer = randomize_norms(attach_ic(nn.Conv2d(6, 4, 3, padding=1, stride=2, bias=bias), IC(6, p=0.2))).train()
    compiled = torch.compile(copy.deepcopy(layer))
    x = torch.randn(4, 6, 9, 9)

    def step(module: nn.Module) -> list[torch.Tensor]:
        torch.manual_seed(0)
        x_run = x.clone().requires_grad_()
        out = module(x_run)
        out.square().sum().backward()
        return [out, x_run.grad, *(p.grad for p in module.parameters())]

    for got, want in zip(step(compiled), step(layer), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_compile_trains_a_converted_resnet18():
    model = icrewrite.convert(timm.create_model("resnet18", pretrained=False)).train()
    loss = train_step(torch.compile(model), torch.randn(4, 3, 32, 32))
    assert torch.isfinite(loss)


def load_benchmark(monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_overhead.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: its sibling modules import
    spec = importlib.util.spec_from_file_location("train_overhead", path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, benchmark)  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    return benchmark


def test_benchmark_runs_in_its_quick_configuration(capsys, monkeypatch):
    load_benchmark(monkeypatch).main(["--quick", "--floors"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet18 | eager |")]
    assert [row.split("|")[3].strip() for row in rows] == [
        "IC", "IC reference", "floor: IC blocks without dropout", "floor: IC blocks in eval mode",
        "floor: IC blocks removed"]
    for row in rows:
        ratios = [float(cell) for cell in row.strip("|").split("|")[4:9] if cell.strip() != "-"]  # time and memory
        assert len(ratios) >= 4 and all(0.1 < r < 10 for r in ratios)


def test_benchmark_runs_under_autocast_in_channels_last(capsys, monkeypatch):
    """The options the GPU check passes (benchmarks/gpu_check.sh), on CPU: bf16 autocast, channels-last."""
    benchmark = load_benchmark(monkeypatch)
    runs = benchmark.variants("resnet18", 32, torch.device("cpu"), compiled=False, amp=torch.bfloat16,
                              channels_last=True)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert runs["IC"].forward_loss(x, torch.tensor([0, 1])).dtype == torch.float32  # cross-entropy autocasts up
    assert runs["IC"].model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    benchmark.main(["--quick", "--amp", "bf16", "--channels-last"])
    out = capsys.readouterr().out
    assert "bf16 autocast, channels-last" in out
    assert [line.split("|")[3].strip() for line in out.splitlines() if line.startswith("| resnet18 | eager |")] == [
        "IC", "IC reference"]


def test_benchmark_floors_do_what_they_say(monkeypatch):
    """The eval-mode and removed floors compute the same training-mode function: IC blocks that are the identity in
    eval mode (a function-preserving conversion) normalise with fixed statistics and drop nothing. The floor without
    dropout normalises with batch statistics and draws no mask."""
    benchmark = load_benchmark(monkeypatch)
    runs = benchmark.variants("resnet18", 32, torch.device("cpu"), compiled=False, floors=True)
    x = torch.randn(4, 3, 32, 32)
    outputs = {label: run.model(x) for label, run in runs.items()}
    torch.testing.assert_close(outputs["floor: IC blocks in eval mode"], outputs["floor: IC blocks removed"])
    assert not torch.allclose(outputs["IC"], outputs["floor: IC blocks removed"])
    blocks = [m for m in runs["floor: IC blocks in eval mode"].model.modules() if isinstance(m, IC)]
    assert blocks and not any(b.norm.training or b.drop.training for b in blocks)
    without_dropout = runs["floor: IC blocks without dropout"].model
    before = [b.norm.running_mean.clone() for b in without_dropout.modules() if isinstance(b, IC)]
    torch.manual_seed(0)
    first = without_dropout(x)
    torch.manual_seed(1)
    torch.testing.assert_close(without_dropout(x), first)  # no mask: nothing random
    after = [b.norm.running_mean for b in without_dropout.modules() if isinstance(b, IC)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # batch statistics, in training mode


@pytest.mark.parametrize("layout", ["channel slice", "class token", "permuted"])
def test_fast_path_normalises_inputs_of_any_layout(layout, path):
    """Res2Net-style convs get channel slices, a ViT head its class token: not contiguous."""
    x = {"channel slice": torch.randn(8, 12, 6, 6)[:, 4:10], "class token": torch.randn(8, 5, 6)[:, 0],
         "permuted": torch.randn(8, 6, 6, 6).permute(0, 1, 3, 2)}[layout]
    ic = randomize_norms(IC(6, P), seed=1).train()
    y = ic(x)
    reference = nn.functional.batch_norm(x, None, None, ic.norm.weight, ic.norm.bias, training=True) / (1 - P)
    kept = y != 0
    torch.testing.assert_close(y[kept], reference[kept].detach())
