"""Files users already have keep working: checkpoints and whole pickled models written by an
earlier icrewrite (tests/data, see write_fixtures.py) load equal to the model that wrote them.

Keep these tests and their files for as long as the formats are supported.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import icrewrite

DATA = Path(__file__).resolve().parent / "data"
NAMES = sorted(p.stem for p in (DATA / "expected").glob("*.json"))


def expected(name: str) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    record = json.loads((DATA / "expected" / f"{name}.json").read_text())
    tensors = safetensors.torch.load_file(DATA / "expected" / f"{name}.safetensors")
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    return record, state, tensors["output"]


def skip_unless_timm_builds_the_writers_architecture(name: str) -> None:
    """A checkpoint rebuilds its architecture from timm's registry: an older timm whose model of
    that name has other layers (timm 1.0.9's ``test_vit``) cannot hold its weights."""
    record, state, _ = expected(name)
    model = icrewrite.convert(timm.create_model(record["architecture"], pretrained=False, **record["create_kwargs"]),
                              **record["options"])
    built = model.state_dict()
    if {n for n, _ in model.named_modules()} != record["classes"].keys() or built.keys() != state.keys() or any(
            state[k].shape != v.shape for k, v in built.items()):
        pytest.skip(f"timm {timm.__version__} builds another {record['architecture']} than timm "
                    f"{record['versions']['timm']}, which wrote the fixture")


def assert_equal_to_writer(model: torch.nn.Module, name: str) -> None:
    record, state, output = expected(name)
    actual = model.state_dict()
    assert actual.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(actual[key], value), key
    classes = {n: type(m) for n, m in model.named_modules()}
    assert classes.keys() == record["classes"].keys()
    for module_name, path in record["classes"].items():
        module, _, qualname = path.rpartition(".")
        assert getattr(importlib.import_module(module), qualname) is classes[module_name], module_name
    x = torch.randn((2, *record["input_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), output, rtol=1e-5, atol=1e-6)


def test_there_are_fixtures():
    assert NAMES == ["byobnet", "efficientnet", "vit"]


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_written_earlier_loads_equal(name):
    skip_unless_timm_builds_the_writers_architecture(name)
    record, _, _ = expected(name)
    assert_equal_to_writer(icrewrite.load(DATA / record["file"]), name)


@pytest.mark.parametrize("name", NAMES)
def test_pickled_model_written_earlier_loads_equal(name):
    skip_unless_timm_builds_the_writers_architecture(name)  # a pickle names timm's classes too
    model = torch.load(DATA / f"{name}.model.pt", weights_only=False)
    assert_equal_to_writer(model, name)
