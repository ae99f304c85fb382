"""The torch section of icrewrite.compat: the same behaviour on every supported torch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from icrewrite import compat

strategies = pytest.importorskip("torch.onnx._internal.exporter._capture_strategies")


def test_the_onnx_exporter_takes_no_draft_export_within_the_block(monkeypatch):
    draft = strategies.TorchExportDraftExportStrategy
    tried = (*[s for s in strategies.CAPTURE_STRATEGIES if s is not draft], draft)  # as torch 2.8 has them
    monkeypatch.setattr(strategies, "CAPTURE_STRATEGIES", tried)
    with compat.onnx_export_without_draft():
        assert draft not in strategies.CAPTURE_STRATEGIES
        assert strategies.CAPTURE_STRATEGIES == tried[:-1]
    assert strategies.CAPTURE_STRATEGIES is tried


@pytest.mark.parametrize("strict", [False, True])
def test_is_exporting_under_export_compile_and_eager(strict):
    class Flag(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return t + (1.0 if compat.is_exporting() else -1.0)

    x = torch.zeros(3)
    assert not compat.is_exporting()
    torch.testing.assert_close(Flag()(x), x - 1)
    torch.testing.assert_close(torch.compile(Flag(), backend="eager", fullgraph=True)(x), x - 1)
    torch.testing.assert_close(torch.export.export(Flag(), (x,), strict=strict).module()(x), x + 1)


def test_forked_rng_seeds_the_block_and_gives_the_callers_state_back():
    from icrewrite.compat import forked_rng

    torch.manual_seed(123)
    expected_after = torch.rand(3)
    torch.manual_seed(123)
    with forked_rng("cpu", seed=7):
        inside = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(3))  # seeded inside
    torch.manual_seed(123)
    with forked_rng("cpu", seed=7):
        torch.rand(100)
    assert torch.equal(torch.rand(3), expected_after)  # the caller's stream goes on as if nothing was drawn
