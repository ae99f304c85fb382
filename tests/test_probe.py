"""The meta probe (icrewrite.rewrite._probe): which weight layers one forward pass calls, whose weights it
reads elsewhere, and that it leaves the model as it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icrewrite import model_info
from icrewrite.rewrite import probe_weight_use


class Head(nn.Module):
    """Applies a weight it is given: another layer's."""

    def forward(self, x, weight):
        return F.linear(x, weight)


class Probed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.head = Head()
        self.seen: list[tuple[torch.Size, torch.device, bool]] = []

    def forward(self, x):
        self.seen.append((x.shape, x.device, self.training))
        h = self.head(self.a(x), self.b.weight)  # b is never called: its weight is read by head's F.linear
        assert h.shape[-1] == self.c.weight.shape[1]  # reading a shape is not a use of the weight
        return self.c(h)


class Tied(nn.Module):
    """An encoder whose weight, transposed, is also the decoder's."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 8)

    def forward(self, x):
        return F.linear(self.enc(x), self.enc.weight.t())


def test_a_called_layer_and_a_layer_whose_weight_another_module_applies():
    usage = probe_weight_use(Probed(), ["a", "b", "c"], input_size=(16,))
    assert usage.called == {"a", "c"}
    assert usage.weight_used_outside == {"b"}


def test_a_layer_can_be_called_and_have_its_weight_used_outside():
    usage = probe_weight_use(Tied(), ["enc"], input_size=(16,))
    assert usage.called == {"enc"} and usage.weight_used_outside == {"enc"}


def test_only_the_layers_asked_about_are_watched():
    usage = probe_weight_use(Probed(), ["a"], input_size=(16,))
    assert usage.called == {"a"} and usage.weight_used_outside == set()


@pytest.mark.parametrize("training", [True, False])
def test_the_model_runs_on_meta_in_eval_mode_and_is_left_as_it_was(training):
    model = Probed().train(training)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    spy = model.register_forward_pre_hook(lambda m, args: calls.append((args[0].shape, args[0].device, m.training)))
    assert probe_weight_use(model, ["a", "b", "c"], input_size=(16,)) is not None
    spy.remove()
    assert calls == [(torch.Size([2, 16]), torch.device("meta"), False)]
    assert model.seen == []  # what the forward put in a plain attribute is undone
    assert model.training is training and all(m.training is training for m in model.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not t.is_meta for t in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_input_size_is_the_models_own_by_default():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    assert model_info.input_size(model) is None
    assert probe_weight_use(model, ["0"]).called == {"0"} and shapes == [(2, *model_info.DEFAULT_INPUT_SIZE)]
    shapes.clear()
    model.pretrained_cfg = {"input_size": (3, 32, 48)}
    assert model_info.input_size(model) == (3, 32, 48)
    assert probe_weight_use(model, ["0"]).called == {"0"}
    assert shapes == [(2, 3, 32, 48)]
    assert len(model._forward_pre_hooks) == 1  # the model's own hook stays, the probe's are gone


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)  # reads a value: meta tensors have none


def test_a_data_dependent_model_gives_none_and_is_left_as_it_was():
    model = DataDependent().train()
    assert probe_weight_use(model, ["a", "b"], input_size=(16,)) is None
    assert model.training and all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_model_on_the_meta_device_is_probed_too():
    with torch.device("meta"):
        model = Probed()
    usage = probe_weight_use(model, ["a", "b", "c"], input_size=(16,))
    assert usage.called == {"a", "c"} and usage.weight_used_outside == {"b"}
