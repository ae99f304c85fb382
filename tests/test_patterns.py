"""Graph patterns the analysis matches (icrewrite.rewrite._patterns), on small traced modules."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, DropPath
from torch import nn

from icrewrite.rewrite import ModuleActivation, trace_scopes
from icrewrite.rewrite._patterns import activation_of, fused_activation, is_passthrough, through_passthrough


def traced(model: nn.Module) -> tuple[dict[str, fx.Node], dict[str, nn.Module]]:
    """The root scope's nodes by name, and the model's modules by name, as the analysis sees them."""
    scope = trace_scopes(model)[0]
    return {n.name: n for n in scope.graph.nodes}, dict(model.named_modules())


class Activations(nn.Module):
    """One activation of each form: module, function with extra arguments, method; and non-activations."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.GELU(approximate="tanh")
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return (self.act(x), self.conv(x),
                F.leaky_relu(x, 0.2),  # traced as negative_slope=0.2
                F.softplus(x, 2.0, 1.0),  # a builtin: extra arguments stay positional
                F.relu(x, inplace=True),
                torch.sigmoid(x), x.relu(), x.tanh_(),
                F.leaky_relu(x, x.mean()),  # an argument computed from the graph
                x.softmax(-1), x.mean(), torch.add(x, 1.0))


@pytest.fixture(scope="module")
def activations():
    return traced(Activations())


def test_an_activation_module_is_named_by_its_path_and_another_module_is_none(activations):
    nodes, modules = activations
    assert activation_of(nodes["act"], modules) == ModuleActivation("act")
    assert activation_of(nodes["act"], modules).resolve(modules[""]) is modules["act"]
    assert activation_of(nodes["conv"], modules) is None


@pytest.mark.parametrize("node,expected", [
    ("leaky_relu", lambda t: F.leaky_relu(t, 0.2)),
    ("softplus", lambda t: F.softplus(t, 2.0, 1.0)),
    ("relu", torch.relu),
    ("sigmoid", torch.sigmoid),
    ("relu_1", torch.relu),  # x.relu()
    ("tanh_", torch.tanh),  # x.tanh_()
])
def test_a_function_or_method_activation_applies_its_extra_arguments_and_not_in_place(activations, node, expected):
    nodes, modules = activations
    fn = activation_of(nodes[node], modules)
    t = torch.linspace(-3, 3, 13)
    before = t.clone()
    torch.testing.assert_close(fn(t), expected(before))
    assert torch.equal(t, before)  # inplace=True and x.tanh_() are not applied in place to what is measured


def test_the_default_of_an_extra_argument_is_not_what_is_applied(activations):
    nodes, modules = activations
    t = torch.linspace(-3, 3, 13)
    assert not torch.allclose(activation_of(nodes["leaky_relu"], modules)(t), F.leaky_relu(t))
    assert not torch.allclose(activation_of(nodes["softplus"], modules)(t), F.softplus(t))


@pytest.mark.parametrize("node", ["leaky_relu_1",  # an argument that is a graph value
                                  "softmax", "mean", "add"])  # not elementwise activations
def test_no_activation_when_an_argument_is_a_graph_value_or_the_op_is_none(activations, node):
    nodes, modules = activations
    assert activation_of(nodes[node], modules) is None


class BuiltinGivenAGraphValue(nn.Module):
    def forward(self, x):
        return F.softplus(x, beta=x.amax())  # a builtin (torch._C._nn.softplus)


def test_no_activation_when_a_builtins_argument_is_a_graph_value():
    scope = trace_scopes(BuiltinGivenAGraphValue())[0]
    if scope.graph is None:  # torch 2.8: the builtin refuses a Proxy where it takes a number; nothing to match
        pytest.skip(f"this torch does not trace a builtin given a traced value: {scope.error}")
    nodes = {n.name: n for n in scope.graph.nodes}
    assert activation_of(nodes["softplus"], dict(BuiltinGivenAGraphValue().named_modules())) is None


class Passthrough(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.drop, self.ident, self.drop2d, self.path = nn.Dropout(0.5), nn.Identity(), nn.Dropout2d(), DropPath(0.1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        z = self.drop2d(self.ident(self.drop(y)))  # a chain of three pass-through layers
        return self.act(z), torch.sigmoid(self.path(z)), F.dropout(z), y + 1


def test_through_passthrough_looks_through_chains_of_identity_dropout_and_drop_path():
    nodes, modules = traced(Passthrough())
    assert [is_passthrough(nodes[n], modules) for n in ("drop", "ident", "drop2d", "path", "conv", "act")] == \
        [True, True, True, True, False, False]
    assert set(through_passthrough(nodes["conv"], modules)) == {nodes["act"], nodes["sigmoid"], nodes["dropout"],
                                                                nodes["add"]}
    # F.dropout is a function call, not a registered pass-through module: it is a consumer
    assert through_passthrough(nodes["drop"], modules) == [nodes["act"], nodes["sigmoid"], nodes["dropout"]]
    assert through_passthrough(nodes["act"], modules) == [nodes["output"]]


def test_a_passthrough_module_called_with_two_arguments_is_not_looked_through():
    class TwoArgs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.ident, self.act = nn.Conv2d(4, 4, 1), nn.Identity(), nn.ReLU()

        def forward(self, x):
            return self.act(self.ident(self.conv(x), x))  # nn.Identity ignores extra arguments

    nodes, modules = traced(TwoArgs())
    assert not is_passthrough(nodes["ident"], modules)
    assert through_passthrough(nodes["conv"], modules) == [nodes["ident"]]


def test_fused_activation_is_the_act_of_a_norm_act_module_only():
    bn_act = BatchNormAct2d(8, act_layer=nn.SiLU)
    assert isinstance(fused_activation(bn_act), nn.SiLU) and fused_activation(bn_act) is bn_act.act
    assert fused_activation(BatchNormAct2d(8, apply_act=False)) is None  # its act is nn.Identity
    assert fused_activation(nn.BatchNorm2d(8)) is None
    odd = nn.BatchNorm2d(8)
    odd.act = "relu"  # an attribute named act that is not a module
    assert fused_activation(odd) is None
