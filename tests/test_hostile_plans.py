"""Plans are hostile input: whatever a plan file or a checkpoint's recorded plan says, reading and
applying it ends in the conversion it describes or in one ``ICRewriteError`` line, imports no
module (a routed class resolves only among the classes ``register_reroute`` declared) and
allocates nothing the model does not need (every edit is checked before any IC block is built).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers import BatchNormAct2d
from torch import nn

import icrewrite
from icrewrite import ICRewriteError, Plan
from icrewrite.errors import ConversionError
from icrewrite.checkpoint import create_timm_model
from icrewrite.layers import IC
from icrewrite.rewrite import replay
from icrewrite.testing import randomize_norms
from nets import SMALL_CNN


class Small(nn.Module):
    """Every edit kind a default plan makes: folds, a fused norm+act, IC blocks with and without
    statistics, a packed self-attention rerouted to a routed class with its own input IC block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), BatchNormAct2d(16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        tokens = x.flatten(2).transpose(1, 2)
        tokens = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        return self.fc(tokens.mean(1))


def small() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(Small(), seed=1).eval()


@pytest.fixture(scope="module")
def valid() -> dict[str, Any]:
    model = small()
    data = icrewrite.plan(model, stem=True).to_dict()
    assert {e["action"] for e in data["edits"]} == {"fold-norm", "replace-norm-act", "insert-ic",
                                                    "route-through-module"}
    icrewrite.convert(model, plan=Plan.from_dict(data))  # imports everything a conversion needs, once
    return data


class ICConstructions:
    """Counts IC blocks built, and the largest; what a hostile plan must not make large."""

    def __init__(self) -> None:
        self.features: list[int] = []


@pytest.fixture
def constructions(monkeypatch: pytest.MonkeyPatch) -> Iterator[ICConstructions]:
    record = ICConstructions()
    original = IC.__init__

    def counting(self: IC, num_features: int, *args: Any, **kwargs: Any) -> None:
        record.features.append(num_features)
        original(self, num_features, *args, **kwargs)

    monkeypatch.setattr(IC, "__init__", counting)
    yield record


def convert_by(data: Any) -> nn.Module:
    """``convert`` of a fresh model by the plan ``data``, as ``convert --plan`` does."""
    return icrewrite.convert(small(), plan=Plan.from_dict(data))


def assert_refused(data: Any, constructions: ICConstructions, match: str = "") -> str:
    """``data`` is refused in one ``ICRewriteError`` line, having imported nothing and built no IC block."""
    before = set(sys.modules)
    with pytest.raises(ICRewriteError, match=match) as info:
        convert_by(data)
    assert set(sys.modules) == before
    assert constructions.features == []
    assert "\n" not in str(info.value)
    return str(info.value)


def edit_of(data: dict[str, Any], action: str, of: str | None = None) -> dict[str, Any]:
    """The first edit of kind ``action`` (on module ``of``, when given)."""
    return next(e for e in data["edits"] if e["action"] == action and of in (None, e["target"]))


def changed(valid: dict[str, Any], action: str, of: str | None = None, **fields: Any) -> dict[str, Any]:
    """``valid`` with ``fields`` of the first ``action`` edit (on ``of``) changed."""
    data = copy.deepcopy(valid)
    edit_of(data, action, of).update(fields)
    return data


# --- the cases of the trust-boundary issue ----------------------------------------------------------

def test_insert_ic_on_an_activation_is_refused(valid, constructions):
    data = changed(valid, "insert-ic", "conv2", target="act1", detail="")
    assert "edits[" in assert_refused(data, constructions, r"\(insert-ic 'act1'\).target: ReLU is not a registered "
                                                           "weight layer")


def test_fold_norm_of_a_convolution_is_refused(valid, constructions):
    data = changed(valid, "fold-norm", target="conv2")
    assert_refused(data, constructions, r"\(fold-norm 'conv2'\).target: Conv2d is not a BatchNorm")


def test_fold_norm_into_a_norm_is_refused(valid, constructions):
    assert_refused(changed(valid, "fold-norm", into="bn2"), constructions, "does not fold exactly into BatchNormAct2d")


@pytest.mark.parametrize("features,message", [
    (-8, r"features: expected a number of at least 0, got -8"),
    (9, r"features: 9 does not match the layer's input features \(8\)"),
    (10**12, r"features: 1000000000000 does not match the layer's input features \(8\)"),
    (8.0, "features: expected int, got float"),
    (True, "features: expected int, got bool"),
    ("8", "features: expected int, got str"),
])
def test_wrong_features_are_refused_before_any_ic_block_is_built(valid, constructions, features, message):
    data = changed(valid, "insert-ic", "conv2", features=features, param_delta=2 * 8)
    assert_refused(data, constructions, message)


def test_huge_features_are_refused_before_allocation_with_consistent_totals(valid, constructions):
    data = changed(valid, "insert-ic", "conv2", features=10**12, param_delta=2 * 10**12)
    data["params_after"] += 2 * 10**12 - 16
    data["param_delta"] += 2 * 10**12 - 16
    assert_refused(data, constructions, "does not match the layer's input features")


@pytest.mark.parametrize("p", [math.nan, math.inf, -0.1, 1.0, 10**12, "0.1", None, True])
def test_an_ic_blocks_p_out_of_range_or_of_another_type_is_refused(valid, constructions, p):
    assert_refused(changed(valid, "insert-ic", "conv2", p=p), constructions, r"edits\[\d+\]\.p: expected")


def test_a_duplicated_edit_is_refused(valid, constructions):
    data = copy.deepcopy(valid)
    edit = edit_of(data, "insert-ic", "conv2")
    data["edits"].append(copy.deepcopy(edit))
    data["params_after"] += edit["param_delta"]
    data["param_delta"] += edit["param_delta"]
    assert_refused(data, constructions, r"edits\[\d+\]: duplicates plan.edits\[\d+\] \(insert-ic 'conv2'\)")


def test_two_folds_into_one_layer_are_refused(valid, constructions):
    data = changed(valid, "replace-norm-act", into="conv1")
    assert_refused(data, constructions, r"duplicates plan.edits\[\d+\] \(replace-norm-act 'conv1'\)")


def test_an_edit_of_a_module_the_model_lacks_is_refused(valid, constructions):
    assert_refused(changed(valid, "insert-ic", "conv2", target="__class__"), constructions,
                   r"not this model \(no module '__class__'\)")


@pytest.mark.parametrize("routed_class", ["planted_module:Evil", "os:system", "builtins:object",
                                          "icrewrite.layers.attention:RoutedShiftedWindowAttention"])
def test_a_routed_class_nobody_declared_is_refused(valid, constructions, routed_class):
    message = assert_refused(changed(valid, "route-through-module", routed_class=routed_class), constructions,
                             "routed_class: ")
    assert "register_reroute" in message or "not a subclass" in message


# --- generated hostile plans --------------------------------------------------------------------

HOSTILE_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2, 10**12, 2**63, -(2**63), math.nan, math.inf, -math.inf, 0.5,
                     1.0, -0.5, "", "x", "conv1", "bn1", "act1", "conv2", "bn2", "bn2.act", "attn", "fc",
                     "attn.out_proj", "planted_module:Evil", "os:system", "icrewrite.layers:IC", "F.relu",
                     "__class__", "a\nb", [], {}, [1], ["conv1"], {"a": 1}]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a value inside a plan dict (keys and list indices)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _parent(data: Any, path: tuple) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


@st.composite
def hostile_plans(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """``valid`` with one to three changes: a value replaced, a key deleted or added, an edit
    duplicated or moved onto another module, a field swapped between edits; then, half the
    time, the plan's totals made to add up again (so that the checks against the model run)."""
    data = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        change = draw(st.sampled_from(["replace", "delete", "add", "duplicate", "retarget", "swap", "swap"]))
        if change == "swap" and isinstance(data.get("edits"), list) and len(data["edits"]) > 1:
            first, second = draw(st.lists(st.integers(0, len(data["edits"]) - 1), min_size=2, max_size=2))
            key = draw(st.sampled_from(["target", "features", "param_delta", "into", "statistics", "feature_dim",
                                        "layers", "p"]))
            a, b = data["edits"][first], data["edits"][second]
            if isinstance(a, dict) and isinstance(b, dict) and key in a and key in b:
                a[key], b[key] = b[key], a[key]
            continue
        if change in ("replace", "delete") and paths:
            path = draw(st.sampled_from(paths))
            parent = _parent(data, path)
            if change == "replace":
                parent[path[-1]] = draw(HOSTILE_VALUES)
            elif isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.pop(path[-1])
        elif change == "add":
            dicts = [data] + [_parent(data, (*p, None)) for p in paths if isinstance(_parent(data, (*p, None)), dict)]
            draw(st.sampled_from(dicts))[draw(st.sampled_from(["extra", "p", "kind", "routed_class"]))] = draw(
                HOSTILE_VALUES)
        elif isinstance(data.get("edits"), list) and data["edits"]:
            index = draw(st.integers(0, len(data["edits"]) - 1))
            edit = copy.deepcopy(data["edits"][index])
            if change == "retarget" and isinstance(edit, dict):
                edit[draw(st.sampled_from(["target", "into"]))] = draw(
                    st.sampled_from(["conv1", "bn1", "act1", "conv2", "bn2", "attn", "fc", "attn.out_proj"]))
                data["edits"][index] = edit
            else:
                data["edits"].append(edit)
    edits = data.get("edits") if isinstance(data.get("edits"), list) else [None]
    deltas = [e.get("param_delta") if isinstance(e, dict) else None for e in edits]
    if draw(st.booleans()) and all(type(d) is int for d in deltas) and type(data.get("params_before")) is int:
        data["param_delta"] = sum(deltas)
        data["params_after"] = data["params_before"] + sum(deltas)
    return data


def _check_hostile(data: dict[str, Any]) -> None:
    """One hostile plan: refused in one line, or converting to a model with the parameters it
    says; no module imported either way, and no IC block larger than the model's widest layer."""
    built: list[int] = []
    original = IC.__init__

    def counting(self: IC, num_features: int, *args: Any, **kwargs: Any) -> None:
        built.append(num_features)
        original(self, num_features, *args, **kwargs)

    before = set(sys.modules)
    IC.__init__ = counting
    try:
        for convert in (convert_by, lambda d: replay(small(), Plan.from_dict(d))):  # convert --plan, load
            built.clear()
            try:
                converted = convert(data)
            except ICRewriteError as err:
                assert "\n" not in str(err)
                assert built == []
            else:
                assert sum(p.numel() for p in converted.parameters()) == Plan.from_dict(data).params_after
                assert max(built, default=0) <= 16
    finally:
        IC.__init__ = original
    assert set(sys.modules) == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_generated_hostile_plans_are_refused_in_one_line_or_convert_as_they_say(valid, data):
    _check_hostile(data.draw(hostile_plans(valid)))


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_many_generated_hostile_plans_are_refused_in_one_line_or_convert_as_they_say(valid, data):
    _check_hostile(data.draw(hostile_plans(valid)))


# --- a planted module is never imported ---------------------------------------------------------

PLANTED = "from pathlib import Path\nPath(__file__).with_suffix('.imported').write_text('ran')\nclass Evil: pass\n"


def plant(folder: Path, name: str) -> Path:
    """A module ``name`` in ``folder`` that leaves ``name.imported`` beside it when imported."""
    (folder / f"{name}.py").write_text(PLANTED)
    return folder / f"{name}.imported"


def with_route_to(data: dict[str, Any], routed_class: str, target: str = "fc") -> dict[str, Any]:
    """``data`` with an edit that reroutes ``target`` to ``routed_class`` (no parameters change)."""
    edit = {"action": "route-through-module", "target": target, "features": 0, "param_delta": 0, "detail": "",
            "layers": [], "routed_class": routed_class, "p": 0.05}
    return {**data, "edits": [*data["edits"], edit]}


def cli(cwd: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """``python -m icrewrite.cli`` in ``cwd``: Python puts ``cwd`` first on ``sys.path``."""
    pythonpath = os.pathsep.join(filter(None, [str(Path(icrewrite.__file__).parents[1]),
                                               os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-m", "icrewrite.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_convert_plan_does_not_import_a_module_planted_in_the_current_folder(tmp_path):
    marker = plant(tmp_path, "planted_module")
    data = icrewrite.plan(timm.create_model(SMALL_CNN, num_classes=10)).to_dict()
    (tmp_path / "hostile.json").write_text(json.dumps(with_route_to(data, "planted_module:Evil")))
    result = cli(tmp_path, "convert", SMALL_CNN, "--num-classes", "10", "--plan", "hostile.json", "-o", "out")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "unknown routed class 'planted_module:Evil'" in last
    assert "register_reroute" in last
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = randomize_norms(create_timm_model(SMALL_CNN, num_classes=10), seed=1).eval()
    return icrewrite.save(icrewrite.convert(model), tmp_path_factory.mktemp("saved") / "ic.safetensors")


def hostile_checkpoint(saved: Path, path: Path, routed_class: str) -> Path:
    """``saved`` with a recorded plan that names ``routed_class``, as another writer could make it."""
    with safetensors.safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["icrewrite_config"])
    config["icrewrite"]["plan"] = with_route_to(config["icrewrite"]["plan"], routed_class)
    safetensors.torch.save_file(safetensors.torch.load_file(saved), path,
                                metadata={**metadata, "icrewrite_config": json.dumps(config)})
    return path


def test_verify_does_not_import_a_module_planted_in_the_current_folder(saved, tmp_path):
    marker = plant(tmp_path, "planted_module")
    hostile_checkpoint(saved, tmp_path / "hostile.safetensors", "planted_module:Evil")
    result = cli(tmp_path, "verify", "hostile.safetensors")
    assert result.returncode == 2, result.stderr
    assert "unknown routed class 'planted_module:Evil'" in result.stderr.strip().splitlines()[-1]
    assert not marker.exists()


@pytest.mark.parametrize("routed_class", ["evil:Evil", "downloaded_model.evil:Evil", "downloaded_model:Evil"])
def test_load_does_not_import_a_module_inside_the_model_folder(saved, tmp_path, monkeypatch, routed_class):
    folder = tmp_path / "downloaded_model"
    folder.mkdir()
    marker = plant(folder, "evil")
    (folder / "__init__.py").write_text(PLANTED)
    checkpoint = hostile_checkpoint(saved, folder / "model.safetensors", routed_class)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    with pytest.raises(ICRewriteError, match=f"unknown routed class '{routed_class}'") as info:
        icrewrite.load(checkpoint)
    assert "\n" not in str(info.value)
    assert set(sys.modules) == before
    assert not marker.exists() and not (folder / "__init__.imported").exists()


def test_an_activation_function_is_looked_up_not_imported(valid, constructions):
    data = copy.deepcopy(valid)
    edit = next(e for e in data["edits"] if e["action"] == "insert-ic" and e["statistics"])
    edit["statistics"]["activation"] = {"function": "planted_module.relu", "args": [], "kwargs": {}}
    with pytest.raises(ConversionError, match="unknown activation function 'planted_module.relu'"):
        Plan.from_dict(data)
