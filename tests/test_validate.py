"""``icrewrite validate``: accuracy, calibration and Monte-Carlo-dropout metrics, checked against an
independent computation from the predictions file; MC sampling with p = 0; the command line."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.utils.data import DataLoader, Subset

import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.testing import randomize_norms
from icrewrite.train.data import DigitsDataset
from icrewrite.train.validate import (ECE_BINS, ValidationError, brier_score, expected_calibration_error, metrics,
                                      reliability_bins, validate)

from nets import TINY


def _loader() -> DataLoader:
    return DataLoader(Subset(DigitsDataset("test", 16), range(120)), batch_size=50)


def _model(p: float = 0.2) -> torch.nn.Module:
    """A tiny IC resnet whose predictions are far from uniform: randomised norms, a sharpened classifier."""
    torch.manual_seed(0)
    model = randomize_norms(icrewrite.convert(create_timm_model("resnet18", **TINY), p=p), seed=1)
    with torch.no_grad():
        model.fc.weight.mul_(8.0)
    return model.eval()


def _read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    assert header[0] == "label"
    return header[1:], np.array([int(r[0]) for r in body]), np.array([[float(x) for x in r[1:]] for r in body])


def _independent(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """NLL, ECE (15 equal-width bins), Brier and top-1 written out sample by sample, without NumPy's help."""
    n, classes = probabilities.shape
    nll = brier = correct = 0.0
    bins = [[0, 0.0, 0.0] for _ in range(15)]  # count, confidence sum, correct sum
    for label, row in zip(labels.tolist(), probabilities.tolist()):
        nll -= math.log(row[label])
        brier += sum((p - (k == label)) ** 2 for k, p in enumerate(row))
        predicted = max(range(classes), key=lambda k: (row[k], -k))
        hit = predicted == label
        correct += hit
        confidence = row[predicted]
        b = 0
        while b < 14 and confidence > (b + 1) / 15:
            b += 1
        bins[b][0] += 1
        bins[b][1] += confidence
        bins[b][2] += hit
    ece = sum(abs(c / k - h / k) * k / n for k, c, h in bins if k)
    return {"nll": nll / n, "ece": ece, "brier": brier / n, "top1": 100 * correct / n}


@pytest.mark.parametrize("mc_samples", [0, 4])
def test_metrics_equal_an_independent_computation_from_the_predictions_file(tmp_path: Path, mc_samples: int) -> None:
    model = _model()
    result = validate(model, _loader(), mc_samples=mc_samples, predictions=tmp_path / "p.csv", png=tmp_path / "r.png")
    names, labels, probabilities = _read_predictions(tmp_path / "p.csv")
    assert names == [str(k) for k in range(10)]  # the model file has no class names: indices
    assert len(labels) == 120 and labels.tolist() == result.labels.tolist()
    scored = result.mc if mc_samples else result.deterministic
    expected = _independent(labels, probabilities)
    assert 0.02 < expected["ece"] and expected["nll"] > 0.1  # not a degenerate case
    for key, value in expected.items():
        assert getattr(scored, key) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    if mc_samples:
        assert result.dropout_modules > 0
        assert scored.mutual_information > 0 and scored.entropy >= scored.mutual_information
        assert not np.allclose(result.mc_probabilities, result.probabilities)  # dropout was on


def test_mc_sampling_with_p0_equals_the_deterministic_pass() -> None:
    model = _model(p=0.0)
    result = validate(model, _loader(), mc_samples=3)
    assert result.dropout_modules == 0
    np.testing.assert_allclose(result.mc_probabilities, result.probabilities, rtol=0, atol=1e-12)
    for key in ("top1", "top5", "loss", "nll", "ece", "brier"):
        assert getattr(result.mc, key) == pytest.approx(getattr(result.deterministic, key), abs=1e-12), key
    assert result.mc.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert "MC sampling equals the deterministic pass" in result.report()


def test_mc_sampling_is_seeded_keeps_the_callers_rng_and_the_models_mode() -> None:
    model = _model().train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = validate(model, _loader(), mc_samples=2, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(m.training for m in model.modules())  # put back in train mode
    again = validate(model, _loader(), mc_samples=2, seed=5)
    other = validate(model, _loader(), mc_samples=2, seed=6)
    np.testing.assert_array_equal(first.mc_probabilities, again.mc_probabilities)
    assert not np.array_equal(first.mc_probabilities, other.mc_probabilities)
    np.testing.assert_array_equal(first.probabilities, other.probabilities)  # the deterministic pass


def test_a_label_outside_the_classifier_is_one_line() -> None:
    torch.manual_seed(0)
    model = create_timm_model("resnet18", **{**TINY, "num_classes": 3}).eval()
    with pytest.raises(ValidationError, match="labels up to .* model has 3 outputs") as raised:
        validate(model, _loader())
    assert "\n" not in str(raised.value)
    with pytest.raises(ValidationError, match="mc_samples"):
        validate(model, _loader(), mc_samples=-1)
    features = create_timm_model("resnet18", **{**TINY, "num_classes": 0, "global_pool": ""}).eval()
    with pytest.raises(ValidationError, match=r"shape \(50, 64, 1, 1\); validate needs class scores"):
        validate(features, _loader())


@st.composite
def _predictions(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n, k = draw(st.integers(1, 30)), draw(st.integers(1, 8))
    raw = draw(arrays(np.float64, (n, k), elements=st.floats(0, 1, allow_nan=False)))
    raw = raw + 1e-9
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, k - 1)))
    return raw / raw.sum(axis=1, keepdims=True), labels


@settings(max_examples=300, deadline=None)
@given(_predictions())
def test_metric_ranges_and_a_perfect_prediction(prediction: tuple[np.ndarray, np.ndarray]) -> None:
    probabilities, labels = prediction
    scored = metrics(probabilities, labels, pass_entropy=np.zeros(len(labels)))
    assert 0.0 <= scored.ece <= 1.0 and 0.0 <= scored.brier <= 2.0 + 1e-12 and scored.nll >= 0
    assert scored.top1 <= scored.top5 <= 100.0
    assert 0.0 <= scored.mutual_information <= scored.entropy + 1e-12
    perfect = np.eye(probabilities.shape[1])[labels]
    assert expected_calibration_error(perfect, labels) == 0 and brier_score(perfect, labels) == 0
    assert metrics(perfect, labels).nll == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(-3, 12), st.integers(1, 6))
def test_bad_labels_or_shapes_are_one_line_errors(label: int, classes: int) -> None:
    probabilities = np.full((2, classes), 1.0 / classes)
    if 0 <= label < classes:
        with pytest.raises(ValidationError, match="shapes"):
            metrics(probabilities[:, :, None], np.array([label, label]))
    else:
        with pytest.raises(ValidationError, match="labels must be class indices") as raised:
            metrics(probabilities, np.array([0, label]))
        assert "\n" not in str(raised.value)


def _confident(confidences: list[float], classes: int = 40) -> np.ndarray:
    """Rows with top-1 probability ``c`` on class 0 and the rest spread evenly."""
    return np.array([[c] + [(1 - c) / (classes - 1)] * (classes - 1) for c in confidences])


def test_ece_bins_are_fifteen_and_equal_width() -> None:
    centres = [(b + 0.5) / ECE_BINS for b in range(ECE_BINS)]
    counts, confidence, _ = reliability_bins(_confident(centres), np.zeros(ECE_BINS, dtype=np.int64))
    assert counts.tolist() == [1] * ECE_BINS and np.allclose(confidence, centres)
    assert reliability_bins(_confident([8 / 15]), np.zeros(1, dtype=np.int64))[0][7] == 1  # (7/15, 8/15]
    # Two samples in one bin (0.6, 0.667], one right and one wrong: the bin's gap |0.5 - 0.63|, not the
    # mean of the per-sample gaps; in two bins the gaps add up per sample.
    same = expected_calibration_error(_confident([0.62, 0.64]), np.array([0, 1]))
    apart = expected_calibration_error(_confident([0.62, 0.70]), np.array([0, 1]))
    assert same == pytest.approx(0.13) and apart == pytest.approx((0.38 + 0.70) / 2)


def test_cli_validate_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from icrewrite.cli import main

    model = tmp_path / "tiny_ic.safetensors"
    icrewrite.save(_model(), model)
    out = ["--predictions", str(tmp_path / "p.csv"), "--png", str(tmp_path / "r.png")]
    assert main(["validate", str(model), "--data", "digits", "--img-size", "16", "--mc-samples", "2", *out]) == 0
    stdout = capsys.readouterr().out
    assert "360 samples, 10 classes" in stdout
    assert stdout.count("top-1") == 2 and "MI " in stdout
    _, labels, probabilities = _read_predictions(tmp_path / "p.csv")
    assert probabilities.shape == (360, 10) and np.allclose(probabilities.sum(axis=1), 1)

    plain = tmp_path / "tiny.safetensors"
    icrewrite.save(create_timm_model("resnet18", **TINY), plain)
    assert main(["validate", str(plain), "--data", "digits", "--img-size", "16", "--mc-samples", "2"]) == 0
    assert "MC sampling equals the deterministic pass" in capsys.readouterr().out

    small = tmp_path / "three.safetensors"
    icrewrite.save(create_timm_model("resnet18", **{**TINY, "num_classes": 3}), small)
    assert main(["validate", str(small), "--data", "digits", "--img-size", "16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the data has labels up to 9 but the model has 3 outputs")
    assert main(["validate", str(small), "--mc-samples", "-1"]) == 2
