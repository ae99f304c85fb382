"""verify (icrewrite.rewrite._verify): parameter and function parity of a converted model."""
from __future__ import annotations

import torch

import icrewrite
from icrewrite.testing import randomize_norms

from nets import timm_model


def test_verify_reports_exact_parity_and_a_changed_function():
    model = randomize_norms(timm_model("resnet18")).eval()
    converted = icrewrite.convert(model)
    report = icrewrite.verify(model, converted, torch.randn(2, 3, 32, 32))
    assert report.params_after - report.params_before == icrewrite.plan(model).param_delta
    assert report.ok and "function preserved" in str(report)
    with torch.no_grad():
        converted.fc.weight.mul_(1.1)
    assert not icrewrite.verify(model, converted, torch.randn(2, 3, 32, 32)).ok
