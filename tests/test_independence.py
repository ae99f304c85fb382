"""Independence measurement: the estimators on data of known dependence, the Dropout laws
(correlation x q, mutual information x q^2) on IC blocks, ``stats`` on a converted timm
model, and the ``icrewrite stats`` command."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import icrewrite
from icrewrite.cli import main
from icrewrite.train.data import make_loader
from icrewrite.independence import PairStatistics, bin_codes, stats
from icrewrite.layers import IC, ICWeightLayer, attach_ic
from icrewrite.registry import is_weight_layer
from icrewrite.testing import randomize_norms

P_VALUES = (0.05, 0.1, 0.3, 0.5)


def gaussian_pair(rho: float, samples: int) -> torch.Tensor:
    """``(2, samples)`` standard bivariate Gaussian with correlation ``rho``."""
    z = torch.randn(2, samples, dtype=torch.float64)
    return torch.stack([z[0], rho * z[0] + math.sqrt(1 - rho**2) * z[1]])


def equicorrelated(rho: float, rows: int, features: int) -> torch.Tensor:
    """``(rows, features)`` Gaussian rows, every pair of features correlated ``rho``, mean 3, std 2."""
    cov = torch.full((features, features), rho) + (1 - rho) * torch.eye(features)
    return torch.randn(rows, features) @ torch.linalg.cholesky(cov).T * 2 + 3


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two codings of the same samples group them identically (labels aside)."""
    pairs = torch.unique(torch.stack([a, b]), dim=1).shape[1]
    return pairs == torch.unique(a).numel() == torch.unique(b).numel()


# --- estimators ----------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.6, 0.9])
def test_estimators_on_bivariate_gaussian(rho):
    """Correlation within 0.02; MI within the documented error: -3..-7% discretisation
    bias with 16 bins (docs/independence.md) plus sampling noise."""
    pair = PairStatistics(2)
    for _ in range(4):
        pair.update(gaussian_pair(rho, 8192))
    truth = -0.5 * math.log(1 - rho**2)
    assert pair.correlation().item() == pytest.approx(rho, abs=0.02)
    assert pair.mutual_information().item() == pytest.approx(truth, abs=0.10 * truth + 0.003)


def test_mutual_information_is_not_fooled_by_dependence_without_correlation():
    """y = x^2 on a symmetric sample has exactly zero correlation with x, yet y is a function of x."""
    z = torch.randn(8192, dtype=torch.float64)
    x = torch.cat([z, -z])
    pair = PairStatistics(2)
    pair.update(torch.stack([x, x.square()]))
    assert abs(pair.correlation().item()) < 1e-6  # float32 sums
    assert pair.mutual_information().item() > 1.0


def test_bins_follow_order_and_keep_atoms_apart():
    """A BatchNorm-like increasing map moves ReLU's zeros to an atom at -1: the grouping of
    samples, and so every MI estimate, stays the same. Dropout's zeros then get a bin of
    their own, apart from the atom and from the continuous values."""
    x = torch.relu(torch.randn(3, 4000, dtype=torch.float64))
    codes = bin_codes(x, 8)
    assert (codes[x == 0] == 8).all() and (codes[x != 0] != 8).all()
    shifted = 3 * x - 1
    for before, after in zip(codes, bin_codes(shifted, 8)):
        assert same_partition(before, after)
    dropped = shifted * (torch.rand_like(shifted) > 0.05)
    for values, row in zip(dropped, bin_codes(dropped, 8)):
        for group in (values == 0, values == -1):
            assert len(torch.unique(row[group])) == 1
            assert not set(row[group].tolist()) & set(row[~group].tolist())


# --- the Dropout laws on an IC block -----------------------------------------------------------


def ic_linear(features: int, p: float) -> nn.Module:
    return attach_ic(nn.Linear(features, 3), IC(features, p, feature_dim=-1))


def ic_conv(features: int, p: float) -> nn.Module:
    return attach_ic(nn.Conv2d(features, 3, 1), IC(features, p))


LAYOUTS = {
    # (IC layer, input batches): tokens (B, N, C) for Linear, images (N, C, H, W) for a convolution
    "linear": (ic_linear, lambda rho, c: equicorrelated(rho, 8192, c).reshape(64, 128, c)),
    "conv": (ic_conv, lambda rho, c: equicorrelated(rho, 8192, c).reshape(32, 16, 16, c).permute(0, 3, 1, 2)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("p", P_VALUES)
def test_ic_block_scales_correlation_by_q_and_mutual_information_by_q_squared(p, layout):
    make_layer, make_batch = LAYOUTS[layout]
    layer = make_layer(8, p)
    batches = [make_batch(0.5, 8) for _ in range(4)]
    site, = stats(layer, batches, max_samples=8192).sites
    q = 1 - p
    assert site.samples == 4 * 8192 and site.pairs == 28 and site.expected_corr_ratio == pytest.approx(q)
    assert site.corr_in == pytest.approx(0.5, abs=0.02)
    assert site.corr_ratio == pytest.approx(q, rel=0.05)  # the target
    assert site.mi_ratio == pytest.approx(q**2, rel=0.10)  # the estimator's documented error


def test_nonzero_ic_mean_lowers_the_correlation_ratio_as_predicted():
    """With BatchNorm shift beta != 0 the IC output is not zero-mean and the correlation
    ratio is q / (1 + p beta^2 / gamma^2) < q; mutual information still scales by q^2."""
    p = 0.3
    layer = ic_linear(8, p)
    with torch.no_grad():
        layer.ic.norm.bias.fill_(2.0)
    site, = stats(layer, [equicorrelated(0.5, 8192, 8) for _ in range(4)], max_samples=8192).sites
    expected = (1 - p) / (1 + p * 4)
    assert site.expected_corr_ratio == pytest.approx(expected)
    assert site.corr_ratio == pytest.approx(expected, rel=0.05)
    assert site.corr_ratio < 0.8 * (1 - p)
    assert site.mi_ratio == pytest.approx((1 - p) ** 2, rel=0.10)


# --- stats on models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(timm.create_model("resnet10t", num_classes=10), seed=1).eval()


@pytest.fixture(scope="module")
def converted(original) -> nn.Module:
    return icrewrite.convert(original)


@pytest.fixture(scope="module")
def digits() -> list:
    """Three batches of 32 real images (the embedded digits at 48x48)."""
    return list(itertools.islice(make_loader("digits", "train", 32, 48, augment=False), 3))


def test_stats_on_a_converted_model_measures_every_ic_site_and_changes_nothing(original, converted, digits):
    state = {k: v.clone() for k, v in converted.state_dict().items()}
    rng = torch.get_rng_state()
    report = stats(converted, digits, original=original)
    assert [s.name for s in report.sites] == [n for n, m in converted.named_modules() if isinstance(m, ICWeightLayer)]
    assert all(s.p == 0.05 for s in report.sites)
    assert {s.name for s in report.original} == {s.name for s in report.sites}
    assert all(s.p is None and s.corr_out is None for s in report.original)
    # train mode without side effects: weights, BatchNorm statistics, mode and RNG as before
    assert all(torch.equal(v, state[k]) for k, v in converted.state_dict().items())
    assert not converted.training and torch.equal(torch.get_rng_state(), rng)
    # the laws, wherever the input dependence is resolved above the estimator's noise
    summary = report.summary()
    assert summary["corr_sites"] >= 5 and summary["mi_sites"] >= 3
    for site in report.sites:
        if site.corr_resolved:
            assert site.corr_ratio == pytest.approx(site.expected_corr_ratio, rel=0.05), site.name
        if site.mi_resolved:
            assert site.mi_ratio == pytest.approx(site.expected_mi_ratio, rel=0.10), site.name


def test_stats_is_reproducible_with_a_seed(converted, digits):
    first = stats(converted, digits[:2], seed=3).to_dict()
    assert stats(converted, digits[:2], seed=3).to_dict() == first
    assert stats(converted, digits[:2], seed=4).to_dict() != first


def test_stats_on_an_original_model_measures_weight_layer_inputs(original, digits):
    report = stats(original, digits[:1])
    assert [s.name for s in report.sites] == [n for n, m in original.named_modules() if is_weight_layer(m)]
    assert not report.converted and report.summary() == {}
    assert all(s.corr_out is None and 0 <= s.corr_in <= 1 for s in report.sites)


def test_report_table_json_and_png(converted, original, digits, tmp_path):
    report = stats(converted, digits, original=original)
    table = str(report)
    assert "|r| orig" in table and "MI out" in table and "median over resolved IC sites" in table
    assert all(f"\n{s.name} " in table for s in report.sites)
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["sites"]) == len(report.sites) and data["summary"]["expected_mi_ratio"] == pytest.approx(0.9025)
    png = tmp_path / "stats.png"
    report.write_png(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.png"]  # no temporary file left behind


def test_empty_loader_is_a_clear_error(converted):
    with pytest.raises(icrewrite.ICRewriteError, match="no batches"):
        stats(converted, [])


# --- command line -------------------------------------------------------------------------------


def test_cli_prints_the_table_and_writes_the_png(tmp_path):
    png = tmp_path / "stats.png"
    result = subprocess.run(
        [sys.executable, "-m", "icrewrite.cli", "stats", "resnet10t", "--num-classes", "10", "--data", "digits",
         "--img-size", "32", "--batches", "1", "--compare-original", "--png", str(png)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "layer" in result.stdout and "|r| orig" in result.stdout and "layer1.0.conv1" in result.stdout
    assert f"wrote {png}" in result.stdout and "... converting" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_refuses_to_compare_a_converted_checkpoint(tmp_path, converted, capsys):
    path = tmp_path / "ic.safetensors"
    icrewrite.save(converted, path)
    code = main(["stats", str(path), "--compare-original", "--batches", "1", "--img-size", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "error: --compare-original converts MODEL, but" in err and "already converted" in err
