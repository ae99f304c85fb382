"""The fast IC training path (icrewrite.fast_ic) against the reference BatchNorm + Dropout modules."""
from __future__ import annotations

import copy
import importlib.util
import io
import math
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

import icrewrite
from icrewrite import fast_ic
from icrewrite.layers import IC, ICBatchNorm, attach_ic, weight_layer_features
from icrewrite.testing import randomize_norms

P = 0.3  # large enough that a wrong mask shows in every comparison


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
def test_fast_path_matches_reference_for_the_same_mask(case, momentum):
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


def test_statistics_stay_accurate_for_a_large_offset():
    """Two-pass statistics: a feature of mean 1000 and std 0.01 in float32 keeps its variance."""
    fast, reference = ic_pair(16, dtype=torch.float32)
    x = 1000 + 0.01 * torch.randn(4, 16, 32, 32)
    assert fast_ic._row_stats_pay_off(x)
    fast(x)
    reference(x)
    torch.testing.assert_close(fast.norm.running_var, reference.norm.running_var, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("row_stats", [False, True])
def test_gradcheck_float64(monkeypatch, row_stats):
    if row_stats:
        monkeypatch.setattr(fast_ic, "_MIN_NUMEL", 0)
    x = torch.randn(3, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True) + 0.5
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert fast_ic._row_stats_pay_off(x) == row_stats

    def fixed_mask(x, weight, bias):
        torch.manual_seed(0)  # the same mask on every evaluation
        return fast_ic.batch_norm_dropout(x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                                          weight, bias, p=P)

    assert torch.autograd.gradcheck(fixed_mask, (x, weight, bias))


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


def test_autocast_bfloat16_matches_reference():
    fast, reference = ic_pair(16, dtype=torch.float32)
    x = torch.randn(4, 16, 32, 32) + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = x.to(torch.bfloat16).requires_grad_()  # what a convolution hands on under autocast
        assert fast_ic.applies(fast.norm, fast.drop, x)
        y = fast(x)
        expected = reference_output(reference, x, (y != 0).to(y.dtype))
    assert y.dtype == torch.bfloat16 and fast.norm.running_mean.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=0.05, rtol=0.02)
    y.float().square().sum().backward()
    assert x.grad is not None and fast.norm.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fast.norm.running_var, reference.norm.running_var, rtol=1e-2, atol=1e-3)


def test_fast_path_is_skipped_where_it_does_not_apply():
    ic = IC(4, P).train()
    x = torch.randn(8, 4, 3, 3)
    assert fast_ic.applies(ic.norm, ic.drop, x)
    assert not fast_ic.applies(ic.norm, ic.drop, torch.randn(1, 4))   # one value per feature: BatchNorm's error
    assert not fast_ic.applies(ic.norm, ic.drop.eval(), x)
    assert not fast_ic.applies(ic.norm, nn.Dropout(0.0).train(), x)
    handle = ic.norm.register_forward_hook(lambda *args: None)
    assert not fast_ic.applies(ic.norm, ic.drop.train(), x)
    handle.remove()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ic(torch.randn(1, 4))


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


def test_ddp_trains_through_the_fast_path(tmp_path):
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


def test_compile_keeps_the_fast_path_in_one_graph():
    model = small_converted()
    explanation = torch._dynamo.explain(copy.deepcopy(model))(torch.randn(4, 3, 8, 8))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    expected = train_step(model, x)
    torch.manual_seed(0)
    torch.testing.assert_close(train_step(torch.compile(compiled), x), expected)  # same masks: the fast path ran
    for a, b in zip(model.state_dict().values(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_trains_a_converted_resnet18():
    model = icrewrite.convert(timm.create_model("resnet18", pretrained=False)).train()
    loss = train_step(torch.compile(model), torch.randn(4, 3, 32, 32))
    assert torch.isfinite(loss)


def test_benchmark_runs_in_its_quick_configuration(capsys, monkeypatch):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_overhead.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: its sibling modules import
    spec = importlib.util.spec_from_file_location("train_overhead", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark.main(["--quick"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet18 | eager | IC")]
    assert len(rows) == 2
    for row in rows:
        ratios = [float(cell) for cell in row.strip("|").split("|")[4:8]]
        assert all(0.1 < r < 10 for r in ratios)
