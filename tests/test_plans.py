"""Plans as data: through JSON and back, replayed on fresh models bit for bit, refused when
malformed, and recorded on the models they convert."""
from __future__ import annotations

import copy
import json
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import BatchNormAct2d
from torch import nn

import icrewrite
from icrewrite import ConversionError, Plan
from icrewrite.rewrite import (SCHEMA_VERSION, FunctionActivation, InsertIC, ModuleActivation, ReplaceNormAct,
                               RouteThroughModule, Statistics, activation_moments, clone_module, plan_of)
from icrewrite.testing import randomize_norms


class Activations(nn.Module):
    """BatchNorms before an activation in every form a plan records: a module, a fused
    BatchNormAct2d, functions with positional and keyword constants, a tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), BatchNormAct2d(8, act_layer=nn.Hardswish)
        self.conv4, self.bn4 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.conv5, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.stem(x)))
        x = F.softplus(self.bn1(self.conv1(x)), 2.0)
        x = F.gelu(self.bn2(self.conv2(x)), approximate="tanh")
        x = self.bn3(self.conv3(x))
        x = self.bn4(self.conv4(x)).relu_()
        return self.fc(self.conv5(x).mean((2, 3)))


def timm_small(name: str, side: int, **kwargs: Any) -> nn.Module:
    return timm.create_model(name, img_size=side, pretrained_cfg_overlay={"input_size": (3, side, side)}, **kwargs)


def torchvision_swin() -> nn.Module:
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                              window_size=[3, 3], stochastic_depth_prob=0.0)


def torchvision_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64)


# name -> (builder, input side, the edit kind or statistics source the model exercises)
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet10t": (lambda: timm.create_model("resnet10t", num_classes=10), 32),
    "test_efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=10), 32),  # BatchNormAct2d
    "test_vit": (lambda: timm.create_model("test_vit", num_classes=10), 160),
    "eva02": (lambda: timm_small("eva02_tiny_patch14_224", 28, depth=2), 28),  # qkv_bias_separate reroute
    "torchvision-swin": (torchvision_swin, 40),  # reroute to a routed class
    "torchvision-vit": (torchvision_vit, 32),  # routed class with an IC block on the attention input
    "activations": (Activations, 16),  # every form of activation statistics
}
CASES = {**{name: (name, {}) for name in MODELS},
         "resnet10t-ic-conv-relu": ("resnet10t", {"layout": "ic-conv-relu", "init": "fresh"}),
         "resnet10t-conv-relu-ic": ("resnet10t", {"layout": "conv-relu-ic", "init": "fresh"}),
         "resnet10t-options": ("resnet10t", {"p": 0.1, "exclude": ["layer1.*"], "head": False})}


def build(name: str) -> nn.Module:
    """The same model with the same weights and randomised norms each time."""
    torch.manual_seed(0)
    return randomize_norms(MODELS[name][0](), seed=1).eval()


def through_json(the_plan: Plan) -> Plan:
    return Plan.from_dict(json.loads(json.dumps(the_plan.to_dict())))


def no_planning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any analysis or planning fail: what runs after this works from a plan's data alone."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was analysed again")

    monkeypatch.setattr(sys.modules["icrewrite.rewrite._apply"], "make_plan", refuse)
    monkeypatch.setattr(sys.modules["icrewrite.rewrite._plan"], "analyse", refuse)


def assert_same_conversion(converted: nn.Module, expected: nn.Module, img_size: int) -> None:
    """``converted`` is ``expected`` exactly: the same state, module classes and eval output."""
    actual, wanted = converted.state_dict(), expected.state_dict()
    assert actual.keys() == wanted.keys()
    assert [k for k in wanted if not torch.equal(actual[k], wanted[k])] == []
    assert {n: type(m) for n, m in converted.named_modules()} == {n: type(m) for n, m in expected.named_modules()}
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), expected.eval()(x))


@pytest.mark.parametrize("case", CASES)
def test_plan_replayed_from_json_converts_a_fresh_model_bit_identically(case, monkeypatch):
    name, options = CASES[case]
    model = build(name)
    the_plan = icrewrite.plan(model, **options)
    replayed = through_json(the_plan)
    assert replayed == the_plan and replayed.to_dict() == the_plan.to_dict()
    assert str(replayed) == str(the_plan) and replayed.summary() == the_plan.summary()
    expected = icrewrite.convert(model, **options)

    no_planning(monkeypatch)
    converted = icrewrite.convert(build(name), plan=replayed)
    assert_same_conversion(converted, expected, MODELS[name][1])
    assert converted.icrewrite_plan == expected.icrewrite_plan == the_plan.to_dict()


def test_the_models_exercise_every_kind_of_edit_and_statistics():
    kinds = {name: {e.action for e in icrewrite.plan(build(name)).edits} for name in MODELS}
    assert "replace-norm-act" in kinds["test_efficientnet"]
    routes = {name: [e for e in icrewrite.plan(build(name)).edits if isinstance(e, RouteThroughModule)]
              for name in ("eva02", "torchvision-swin", "torchvision-vit")}
    assert {e.routed_class for e in routes["eva02"]} == {None}
    assert {e.routed_class for e in routes["torchvision-swin"]} == {
        "icrewrite.layers.attention:RoutedShiftedWindowAttention"}
    assert {(e.routed_class, e.features) for e in routes["torchvision-vit"]} == {
        ("icrewrite.layers.attention:RoutedMultiheadAttention", 32)}
    layouts = icrewrite.plan(build("resnet10t"), layout="conv-relu-ic", init="fresh")
    assert {"move-act", "insert-ic-after"} <= {e.action for e in layouts.edits}


def test_statistics_record_the_activation_and_reproduce_its_moments():
    model = build("activations")
    the_plan = icrewrite.plan(model)
    sources = {e.target: e.statistics for e in the_plan.edits if isinstance(e, InsertIC)}
    assert sources == {
        "conv1": Statistics("bn0", ModuleActivation("act0")),
        "conv2": Statistics("bn1", FunctionActivation("F.softplus", (2.0,))),
        "conv3": Statistics("bn2", FunctionActivation("F.gelu", kwargs=(("approximate", "tanh"),))),
        "conv4": Statistics("bn3", ModuleActivation("bn3.act")),
        "conv5": Statistics("bn4", FunctionActivation("Tensor.relu")),
        "fc": None,
    }
    assert isinstance(next(e for e in the_plan.edits if e.target == "bn3"), ReplaceNormAct)
    converted = icrewrite.convert(model, plan=through_json(the_plan))
    functions = {"conv1": nn.SiLU(), "conv2": lambda t: F.softplus(t, 2.0),
                 "conv3": lambda t: F.gelu(t, approximate="tanh"), "conv4": nn.Hardswish(), "conv5": torch.relu}
    for target, act in functions.items():
        norm = model.get_submodule(sources[target].norm)
        mean, var = activation_moments(act, norm.bias.detach(), norm.weight.detach())
        ic = converted.get_submodule(target).ic.norm
        torch.testing.assert_close(ic.running_mean, mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ic.running_var, var, rtol=1e-6, atol=1e-7)


def _edit(data: dict, action: str) -> dict:
    return next(e for e in data["edits"] if e["action"] == action)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A change to a plan dict: ``path`` is dotted keys, ``edit:ACTION`` for the first edit of a kind."""
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = _edit(data, key.removeprefix("edit:")) if key.startswith("edit:") else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return change


_DELETE = object()
MALFORMED = {
    "another schema version": (_set("schema", SCHEMA_VERSION + 1), "plan schema version 3 is not supported"),
    "no schema version": (_set("schema", _DELETE), "not a plan"),
    "an unknown key": (_set("extra", 1), "malformed plan: plan: unknown extra"),
    "a missing key": (_set("notes", _DELETE), "malformed plan: plan: missing notes"),
    "an unknown action": (_set("edit:insert-ic.action", "paint"), r"edits\[\d+\]: unknown action 'paint'"),
    "a string for a number": (_set("edit:insert-ic.features", "64"), r"features: expected int, got str"),
    "a boolean for a number": (_set("params_before", True), "params_before: expected int, got bool"),
    "a bad feature dim": (_set("edit:insert-ic.feature_dim", 2), "feature_dim: expected 1 or -1, got 2"),
    "an unknown edit field": (_set("edit:fold-norm.colour", "red"), "unknown colour"),
    "an unknown activation": (_set("edit:insert-ic.statistics", {"norm": "bn1", "activation": {
        "function": "os.system", "args": [], "kwargs": {}}}), "unknown activation function 'os.system'"),
    "an activation argument that is no constant": (_set("edit:insert-ic.statistics", {"norm": "bn1", "activation": {
        "function": "F.relu", "args": [[1]], "kwargs": {}}}), "activation arguments must be"),
    "totals that do not add up": (_set("param_delta", 1), "param_delta: 1 does not add up"),
    "invalid options": (_set("options.p", 2.0), r"plan.options.p: expected a dropout probability in \[0, 1\)"),
    "an IC block's p out of range": (_set("edit:insert-ic.p", -0.5), r"edits\[0\].p: expected a dropout probability"),
    "a note of an unknown kind": (lambda data: data["notes"][0].update(kind="whim"), "unknown kind 'whim'"),
    "options of the wrong type": (_set("options.exclude", "layer1"), "options.exclude: expected list"),
    "an empty object": (lambda data: data.clear(), "not a plan"),
    "an action that is no string": (_set("edit:insert-ic.action", ["insert-ic"]), r"unknown action \['insert-ic'\]"),
    "an edit that is no object": (lambda data: data["edits"].append(3), r"edits\[\d+\]: expected an object, got int"),
    "a key with a newline": (_set("edit:fold-norm.a\nb", 1), r"unknown a\\nb"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_from_dict_refuses_other_versions_and_malformed_dicts_in_one_line(case):
    data = icrewrite.plan(build("resnet10t")).to_dict()
    for edit in data["edits"]:  # one insert-ic edit with statistics comes first, so changes to it show
        if edit["action"] == "insert-ic" and edit["statistics"]:
            data["edits"].remove(edit)
            data["edits"].insert(0, edit)
            break
    change, message = MALFORMED[case]
    change(data)
    with pytest.raises(ConversionError, match=message) as info:
        Plan.from_dict(data)
    assert "\n" not in str(info.value)


def test_from_dict_refuses_what_is_not_an_object():
    for data in ([], "plan", None):
        with pytest.raises(ConversionError, match="not a plan"):
            Plan.from_dict(data)


def test_a_plan_for_another_model_is_refused():
    the_plan = through_json(icrewrite.plan(build("resnet10t")))
    with pytest.raises(ConversionError, match="plan was made for resnet10t .* parameters, not this model"):
        icrewrite.convert(build("test_efficientnet"), plan=the_plan)


@pytest.mark.parametrize("routed_class,message", [
    ("no_such_module_here:Attention", "unknown routed class 'no_such_module_here:Attention': no register_reroute call"),
    ("icrewrite.layers:NoSuchClass", "unknown routed class"),
    ("icrewrite.layers:ic_class", "unknown routed class"),
    ("icrewrite.layers.attention:RoutedShiftedWindowAttention",
     "cannot reroute MultiheadAttention to RoutedShiftedWindowAttention, which is not a subclass of it"),
])
def test_a_routed_class_must_be_a_registered_subclass_of_the_attention(routed_class, message):
    data = icrewrite.plan(build("torchvision-vit")).to_dict()
    for edit in data["edits"]:
        if edit["action"] == "route-through-module":
            edit["routed_class"] = routed_class
    with pytest.raises(ConversionError, match=message) as info:
        icrewrite.convert(build("torchvision-vit"), plan=Plan.from_dict(data))
    assert "register_reroute" in str(info.value) or "not a subclass" in str(info.value)


def test_a_converted_model_keeps_its_plan_through_copies_and_pickles():
    model = build("test_efficientnet")
    converted = icrewrite.convert(model, p=0.1)
    expected = icrewrite.plan(model, p=0.1)
    assert plan_of(converted) == expected and plan_of(model) is None
    for copied in (clone_module(converted), copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert plan_of(copied) == expected
    assert icrewrite.convert(converted).icrewrite_plan == converted.icrewrite_plan  # converting again: no change


PLAN_FIXTURES = Path(__file__).resolve().parent / "data" / "plans"  # schema 1, see data/write_fixtures.py


def test_every_case_has_a_plan_written_earlier():
    assert sorted(p.stem for p in PLAN_FIXTURES.glob("*.json")) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_written_earlier_reads_as_todays_plan_and_replays_equal(case, monkeypatch):
    """Plans written by an earlier icrewrite (schema 1) stay readable: each reads as the plan
    today's code makes for the same model and options, and converts a fresh model as
    ``convert(model, **options)`` does. Keep these files and this test."""
    name, options = CASES[case]
    written = json.loads((PLAN_FIXTURES / f"{case}.json").read_text())
    assert written["schema"] == 1
    read = Plan.from_dict(written)
    assert read == icrewrite.plan(build(name), **options)
    expected = icrewrite.convert(build(name), **options)
    no_planning(monkeypatch)
    converted = icrewrite.convert(build(name), plan=read)
    assert_same_conversion(converted, expected, MODELS[name][1])


def test_every_edit_kind_is_one_class_with_its_checks_phase_and_effect():
    from icrewrite.rewrite import Edit, Phase
    from icrewrite.rewrite._edits import EDIT_KINDS

    def subclasses(cls: type) -> set[type]:
        return {c for sub in cls.__subclasses__() for c in {sub, *subclasses(sub)}}

    assert set(EDIT_KINDS.values()) == subclasses(Edit)
    for action, kind in EDIT_KINDS.items():
        assert kind.action == action and isinstance(kind.phase, Phase)
        assert kind.check is not Edit.check and kind.apply is not Edit.apply, action
    made = {e.action for case, (name, options) in CASES.items() for e in icrewrite.plan(build(name), **options).edits}
    assert made == set(EDIT_KINDS)  # the cases exercise every kind, and their schema-1 files stay read
