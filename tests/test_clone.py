"""clone_module (icrewrite.rewrite._clone): a deep copy of a module tree, as copy.deepcopy would make it."""
from __future__ import annotations

import torch
from torch import nn

from icrewrite.rewrite import clone_module

from nets import PATTERNS


def tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def test_new_parameter_and_buffer_storage_with_the_same_values():
    model = PATTERNS["residual"]()
    model.fc.weight.requires_grad_(False)
    clone = clone_module(model)
    assert {t.data_ptr() for t in tensors(model)}.isdisjoint(t.data_ptr() for t in tensors(clone))
    for (name, a), b in zip(model.named_parameters(), clone.parameters()):
        assert type(b) is nn.Parameter and b.requires_grad == a.requires_grad and torch.equal(a, b), name
    assert not clone.fc.weight.requires_grad
    with torch.no_grad():
        clone.conv1.weight.add_(1)
        clone.bn1.running_mean.add_(1)
    assert not torch.equal(clone.conv1.weight, model.conv1.weight)
    assert not torch.equal(clone.bn1.running_mean, model.bn1.running_mean)


def test_same_structure_state_dict_modes_and_function():
    model = PATTERNS["squeeze_excite"]()
    model.dw.eval()  # one submodule in another mode than the model
    clone = clone_module(model)
    assert [(n, type(m)) for n, m in clone.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    assert all(a is not b for a, b in zip(clone.modules(), model.modules()))
    assert [m.training for m in clone.modules()] == [m.training for m in model.modules()]
    original, copied = model.state_dict(), clone.state_dict()
    assert list(copied) == list(original) and all(torch.equal(original[k], copied[k]) for k in original)
    model.eval()
    clone.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_hooks_are_copied_and_bound_methods_bind_to_the_clone():
    class Counting(nn.Linear):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.calls = 0
            self.register_forward_pre_hook(self.count)

        def count(self, module, args) -> None:
            self.calls += 1

    model = nn.Sequential(Counting(), nn.ReLU())
    seen = []
    handle = model[1].register_forward_hook(lambda m, args, out: seen.append(m))
    clone = clone_module(model)
    handle.remove()  # removes the model's hook only
    clone(torch.randn(2, 4))
    assert seen == [clone[1]]
    assert clone[0].calls == 1 and model[0].calls == 0
    model(torch.randn(2, 4))
    assert seen == [clone[1]] and model[0].calls == 1 and clone[0].calls == 1


def test_immutables_are_shared_and_mutable_attributes_copied():
    model = nn.Conv2d(3, 8, 3, padding=(1, 1))
    model.tag, model.dtype_hint = "stem", torch.float16
    model.config, model.history, model.pair = {"k": [1, 2]}, [], ([1], 2)
    model.constant = torch.arange(3.0)  # a plain attribute, not a buffer
    clone = clone_module(model)
    assert clone.kernel_size is model.kernel_size and clone.padding is model.padding
    assert clone.tag is model.tag and clone.dtype_hint is model.dtype_hint
    assert clone.config == model.config and clone.config is not model.config
    assert clone.config["k"] is not model.config["k"]
    assert clone.history == [] and clone.history is not model.history
    assert clone.pair == model.pair and clone.pair[0] is not model.pair[0]  # a tuple holding a list is copied
    assert torch.equal(clone.constant, model.constant) and clone.constant.data_ptr() != model.constant.data_ptr()


def test_shared_parameters_and_modules_stay_shared_in_the_copy():
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
            self.dec.weight = self.enc.weight  # tied
            self.act = nn.ReLU()
            self.again = self.act  # one module under two names
            self.__dict__["first"] = self.enc  # a plain attribute that is a registered module
            self.__dict__["gain"] = self.enc.bias  # and one that is a registered parameter

    model = Shared()
    clone = clone_module(model)
    assert clone.dec.weight is clone.enc.weight and clone.enc.weight is not model.enc.weight
    assert clone.again is clone.act and clone.act is not model.act
    assert clone.first is clone.enc and clone.gain is clone.enc.bias


class Scaled(nn.Conv2d):
    """A module subclass with attributes and a forward of its own."""

    def __init__(self) -> None:
        super().__init__(3, 4, 1, bias=False)
        self.scale = 2.5
        self.groups_of = {"a": [0, 1], "b": [2, 3]}
        self.register_module("unused", None)

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_module_subclass_keeps_its_class_attributes_and_empty_slots():
    model = Scaled()
    clone = clone_module(model)
    assert type(clone) is Scaled and clone.scale == 2.5 and clone.groups_of == model.groups_of
    assert clone.groups_of is not model.groups_of
    assert clone.bias is None and "bias" in clone._parameters and clone._modules == {"unused": None}
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_a_module_with_its_own_deepcopy_is_copied_by_it():
    class Marked(nn.Linear):
        def __deepcopy__(self, memo):
            new = Marked(self.in_features, self.out_features)
            new.marked = True
            memo[id(self)] = new
            return new

    model = nn.Sequential(Marked(4, 4), nn.ReLU())
    clone = clone_module(model)
    assert type(clone[0]) is Marked and clone[0].marked and not hasattr(model[0], "marked")


def test_modules_on_the_meta_device():
    with torch.device("meta"):
        model = PATTERNS["chain"]()
    clone = clone_module(model)
    assert all(t.is_meta for t in tensors(clone))
    assert [(n, t.shape, t.dtype) for n, t in clone.state_dict().items()] == \
        [(n, t.shape, t.dtype) for n, t in model.state_dict().items()]


def test_tensor_subclasses_keep_their_own_copy_semantics():
    class Marked(nn.Parameter):
        pass

    model = nn.Linear(4, 4)
    model.weight = Marked(model.weight.detach().clone())
    clone = clone_module(model)
    assert type(clone.weight) is Marked and torch.equal(clone.weight, model.weight)
    assert clone.weight.data_ptr() != model.weight.data_ptr()
    lazy = clone_module(nn.Sequential(nn.LazyLinear(4)))  # uninitialised parameters cannot be detached
    assert isinstance(lazy[0].weight, nn.parameter.UninitializedParameter)
