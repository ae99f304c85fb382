"""Hostile checkpoint metadata: whatever a file's config section says, ``load``/``check`` build
the model it describes or refuse with one ``ICRewriteError`` line, and import nothing.

Configs are generated from a real checkpoint by deleting fields, swapping their types,
putting numbers out of range and adding unknown names (the plan inside is replaced or deleted
as a whole here: its own fields are ``Plan.from_dict``'s, tested with the plans).
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors
import safetensors.torch
import timm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import icrewrite
from icrewrite.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check
from icrewrite.errors import CheckpointError, ICRewriteError

ARCH = "test_efficientnet"  # timm's test model: 100k parameters, rebuilt in a few hundredths of a second
EXAMPLES = 150


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    icrewrite.save(icrewrite.convert(timm.create_model(ARCH, num_classes=4).eval()), folder)
    check(folder)  # warm: every module a load imports is imported now
    return folder


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into ``value`` (dict keys and list indices), except inside the recorded plan."""
    found = [prefix] if prefix else []
    if prefix == ("icrewrite", "plan"):
        return found
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = list(enumerate(value))[:3]
    else:
        return found
    for key, item in items:
        found += paths(item, (*prefix, key))
    return found


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([10**12, -1, 0, 2**63, 3.5, float("nan"), float("inf")]), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["os", "subprocess:Popen", "this", "hf-hub:timm/resnet18", "local-dir:.",
                                           "resnet18", "__import__"]),
    st.lists(st.integers(min_value=-5, max_value=10**9), max_size=4), st.dictionaries(st.text(max_size=8), st.integers(),
                                                                                       max_size=3),
)


@st.composite
def mutated(draw, base: dict) -> dict:
    config = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        where = draw(st.sampled_from(paths(config)))
        parent = config
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
        if action == "delete":
            del parent[where[-1]]
        elif action == "replace" or not isinstance(parent[where[-1]], dict):
            parent[where[-1]] = draw(HOSTILE)
        else:
            name = draw(st.sampled_from(["unknown", "pretrained", "checkpoint_path", "features_only", "__class__",
                                         "p", "module", "class"]))
            parent[where[-1]][name] = draw(HOSTILE)
        if not paths(config):
            break
    return config


def assert_one_line_refusal_or_a_model(path: Path) -> None:
    before = set(sys.modules)
    try:
        check(path)
    except ICRewriteError as err:
        message = str(err)
        assert message and "\n" not in message and "Traceback" not in message, message
    assert set(sys.modules) - before == set()


def _config_of(saved: Path) -> dict:
    return json.loads((saved / CONFIG_NAME).read_text())


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_folder_configs_are_refused_in_one_line(saved, tmp_path, data):
    config = data.draw(mutated(_config_of(saved)))
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    os.link(saved / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    assert_one_line_refusal_or_a_model(folder)


@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                             HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_file_metadata_is_refused_in_one_line(saved, tmp_path, data):
    """The single-file layout: the config is in the safetensors metadata."""
    config = data.draw(mutated(_config_of(saved)))
    tensors = safetensors.torch.load_file(saved / WEIGHTS_NAME)
    path = tmp_path / f"case{len(list(tmp_path.iterdir()))}.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "icrewrite_config": json.dumps(config)})
    assert_one_line_refusal_or_a_model(path)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_many_hostile_folder_configs(saved, tmp_path, data):
    test_hostile_folder_configs_are_refused_in_one_line.hypothesis.inner_test(saved, tmp_path, data)


def _edited(saved: Path, tmp_path: Path, edit) -> Path:
    config = _config_of(saved)
    edit(config)
    folder = tmp_path / "edited"
    folder.mkdir()
    os.link(saved / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


CASES = [  # (edit, the message)
    (lambda c: c.update(architecture=5), r"malformed checkpoint config: architecture: expected str, got int"),
    (lambda c: c.update(architecture="hf-hub:timm/resnet18"), r"architecture: 'hf-hub:timm/resnet18' is not an arch"),
    (lambda c: c.update(architecture="resnt18"), r"architecture: 'resnt18' is not an architecture of this timm"),
    (lambda c: c.update(model_args="num_classes=4"), r"model_args: expected dict, got str"),
    (lambda c: c["model_args"].update(pretrained=True), r"model_args: 'pretrained' cannot be recorded"),
    (lambda c: c["model_args"].update(num_classes=10**12), r"model_args.num_classes: 1000000000000 is out of range"),
    (lambda c: c["model_args"].update(num_classes=40), r"2 shape mismatches \(classifier.bias: file \(4,\), model \(40,\)"),
    (lambda c: c["icrewrite"].pop("probe"), r"icrewrite.probe: missing"),
    (lambda c: c["icrewrite"].update(options=[0.05]), r"icrewrite.options: expected dict or null, got list"),
    (lambda c: c["icrewrite"]["options"].update(inplace=True), r"malformed checkpoint config: icrewrite.options: unknown inplace"),
    (lambda c: c["icrewrite"].update(extra=1), r"icrewrite: unknown extra"),
    (lambda c: c["icrewrite"]["probe"].update(input_size=[3, 10**6, 10**6]), r"icrewrite.probe.input_size: expected"),
    (lambda c: c["icrewrite"]["probe"].update(input_size=[3, 4096, 4096]), r"larger than any model input checked"),
    (lambda c: c["icrewrite"]["probe"].update(seed=-1), r"icrewrite.probe.seed: -1 is not a seed"),
    (lambda c: c["pretrained_cfg"].update(input_size=[3, 0, 160]), r"pretrained_cfg.input_size: expected 3 sizes"),
    (lambda c: c.update(icrewrite=[]), r"icrewrite: expected dict, got list"),
    (lambda c: c["model_args"].update(num_classes={"\n": 10**7}), r"model_args.num_classes.\\n: 10000000 is out of"),
    (lambda c: c["pretrained_cfg"].update({"\r": 10**7}), r"pretrained_cfg.\\r: 10000000 is out of range"),
]


@pytest.mark.parametrize("text", ["[" * 100_000, "{\"icrewrite\": " * 50_000, "\udcff", "nul\x00l"])
def test_unparseable_config_json_is_one_line(saved, tmp_path, text):
    folder = tmp_path / "edited"
    folder.mkdir()
    os.link(saved / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=r"config.json: not a readable checkpoint") as caught:
        icrewrite.load(folder)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("edit, message", CASES)
def test_each_field_is_checked_and_named(saved, tmp_path, edit, message):
    folder = _edited(saved, tmp_path, edit)
    before = set(sys.modules)
    with pytest.raises(CheckpointError, match=message) as caught:
        icrewrite.load(folder)
    assert str(caught.value).startswith(f"{folder}") and "\n" not in str(caught.value)
    assert set(sys.modules) - before == set()


def test_a_config_for_a_larger_model_is_refused_before_it_is_built(saved, tmp_path, monkeypatch):
    """A recorded width far beyond the file's tensors is found on the meta device: the real
    model is never built (the builder runs once, on meta)."""
    folder = _edited(saved, tmp_path, lambda c: c["model_args"].update(num_classes=1_000_000))
    devices = []
    create = timm.create_model

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr("icrewrite.compat.timm.create_model", recording)
    with pytest.raises(CheckpointError, match="does not fit"):
        icrewrite.load(folder)
    assert devices == ["meta"]
