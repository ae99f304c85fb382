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


def test_eval_mode_gives_each_module_its_own_mode_back():
    from torch import nn

    from icrewrite.rewrite import eval_mode

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
