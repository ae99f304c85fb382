"""Checkpoint I/O: every timm weights format, refusal of unsafe or broken files, save/load round trips."""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch
from timm.models._hub import save_config_for_hf

import icrewrite
from icrewrite import CheckpointError, Plan
from icrewrite.checkpoint import (check, create_timm_model, example_input, fit_state_dict, load_model, read_config,
                                  read_state_dict, save)
from icrewrite.compat import TIMM_READS_LOCAL_DIR, TIMM_RECORDS_MODEL_ARGS
from icrewrite.testing import randomize_norms

from pickles import Marker, Metadata
from icrewrite.rewrite import TOLERANCE, plan_of

ARCH = "resnet10t"  # timm's smallest ResNet (4.9M parameters), in every timm version
SMALL = {"num_classes": 10, "pretrained_cfg_overlay": {"input_size": (3, 64, 64)}}  # 64x64 probes: fast


def make_model() -> torch.nn.Module:
    return timm.create_model(ARCH, **SMALL)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return randomize_norms(make_model(), seed=1).eval()


@pytest.fixture(scope="module")
def converted(model: torch.nn.Module) -> torch.nn.Module:
    return icrewrite.convert(model)


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def eval_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- reading every format ------------------------------------------------------------------


def _write_format(path: Path, layout: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Write ``state_dict`` the way a timm user's checkpoint of ``layout`` holds it."""
    stale = {k: torch.zeros_like(v) for k, v in state_dict.items()}
    if layout == "safetensors":
        safetensors.torch.save_file(state_dict, path)
    elif layout == "plain":
        torch.save(state_dict, path)
    elif layout == "legacy":
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    elif layout == "train":  # timm train.py: DDP prefixes, epoch, argparse args
        torch.save({"epoch": 3, "arch": ARCH, "args": argparse.Namespace(lr=0.1),
                    "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    elif layout == "model":
        torch.save({"model": state_dict, "optimizer": {"lr": 0.1}}, path)
    elif layout == "ema":  # EMA weights are preferred, as timm does
        torch.save({"state_dict": stale, "state_dict_ema": state_dict}, path)
    elif layout == "compiled":
        torch.save({f"_orig_mod.module.{k}": v for k, v in state_dict.items()}, path)


FORMATS = [
    ("w.safetensors", "safetensors"),
    ("w.pth", "plain"),
    ("w.pth", "legacy"),
    ("w.pth.tar", "train"),
    ("pytorch_model.bin", "plain"),
    ("w.pth", "model"),
    ("w.pth.tar", "ema"),
    ("w.pt", "compiled"),
]


@pytest.mark.parametrize(("name", "layout"), FORMATS, ids=[f"{n}-{layout}" for n, layout in FORMATS])
def test_read_state_dict_every_format(tmp_path, model, name, layout):
    expected = model.state_dict()
    path = tmp_path / name
    _write_format(path, layout, expected)
    assert_same_tensors(read_state_dict(path), expected)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    zipped, raw = tmp_path / "evil.pth", tmp_path / "evil_raw.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Marker(marker)}, zipped)
    raw.write_bytes(pickle.dumps({"w": Marker(marker)}))
    with pytest.raises(CheckpointError, match=r"evil.pth: refused to unpickle: the file would import posix.system"):
        read_state_dict(zipped)
    with pytest.raises(CheckpointError, match=r"evil_raw.pth: not a tensor-only checkpoint.*--unsafe-pickle"):
        read_state_dict(raw)
    assert not marker.exists()


def test_unsafe_pickle_is_an_explicit_loudly_warned_opt_in(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": Metadata()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    with pytest.warns(UserWarning, match="unsafe pickle.*runs any code"):
        assert torch.equal(read_state_dict(path, unsafe_pickle=True)["w"], torch.ones(2))


@pytest.mark.parametrize("name", ["w.pth", "w.safetensors"])
def test_truncated_file_names_file_and_problem(tmp_path, model, name):
    path = tmp_path / name
    _write_format(path, "safetensors" if name.endswith(".safetensors") else "plain", model.state_dict())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{name}: not a readable checkpoint, truncated or corrupt \(\w+"):
        read_state_dict(path)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", b"definitely not a checkpoint"])
def test_corrupt_file_names_file(tmp_path, content):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="w.pth: not a (readable|tensor-only) checkpoint"):
        read_state_dict(path)


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: no such file"):
        read_state_dict(tmp_path / "nope.pth")
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "net": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"holds no state dict: 2 entries are not tensors \(epoch, net\)"):
        read_state_dict(path)


# --- fitting a state dict to a model -------------------------------------------------------


def test_fit_names_missing_and_unexpected_keys(model):
    state_dict = dict(model.state_dict())
    del state_dict["fc.weight"], state_dict["fc.bias"]
    state_dict.update({f"extra.{i}": torch.zeros(1) for i in range(5)})
    target = timm.create_model(ARCH, num_classes=10)
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(target, state_dict, source="w.pth")
    message = str(info.value)
    assert "\n" not in message
    assert f"w.pth does not fit {ARCH}" in message
    assert "2 missing keys (fc.weight, fc.bias)" in message
    assert "5 unexpected keys (extra.0, extra.1, extra.2 and 2 more)" in message


def test_fit_names_shapes_and_the_classifier_size(model):
    target = timm.create_model(ARCH, num_classes=7)
    with pytest.raises(CheckpointError, match=r"fc.weight: file \(10, 512\), model \(7, 512\).*the file has 10 classes "
                                              r"\(--num-classes 10\)"):
        fit_state_dict(target, model.state_dict(), source="w.pth")


def test_fit_says_when_the_file_is_another_architecture(model):
    with pytest.raises(CheckpointError, match=r"only \d+ of \d+ tensors match: a checkpoint for another architecture"):
        fit_state_dict(timm.create_model("test_efficientnet"), model.state_dict(), source="w.pth")


def test_fit_loads_a_fitting_state_dict(model):
    target = timm.create_model(ARCH, num_classes=10)
    fit_state_dict(target, model.state_dict(), source="w.pth")
    assert_same_tensors(target.state_dict(), model.state_dict())


# --- making models -------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_timm_names():
    with pytest.raises(CheckpointError, match="unknown timm model 'resnt18'; did you mean resnet18"):
        create_timm_model("resnt18")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model("no/such/folder")


def test_load_model_with_checkpoint_and_kwargs(tmp_path, model):
    path = tmp_path / "w.pth.tar"
    _write_format(path, "train", model.state_dict())
    loaded = load_model(ARCH, checkpoint=path, num_classes=10)
    assert_same_tensors(loaded.state_dict(), model.state_dict())


def test_load_model_refuses_a_weights_file_as_model(tmp_path, model):
    path = tmp_path / "w.safetensors"
    _write_format(path, "safetensors", model.state_dict())
    with pytest.raises(CheckpointError, match="weights file without an architecture.*--checkpoint"):
        load_model(path)


def test_load_model_reads_a_timm_folder(tmp_path, model):
    save_config_for_hf(model, tmp_path / "config.json")
    safetensors.torch.save_model(model, tmp_path / "model.safetensors")
    for source in (tmp_path, f"local-dir:{tmp_path}"):
        assert_same_tensors(load_model(source).state_dict(), model.state_dict())


# --- save and load ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ic.safetensors", "ic_folder"])
def test_save_load_round_trip_preserves_function(tmp_path, model, converted, name):
    x = example_input(model)
    report = icrewrite.verify(model, converted, x)
    path = save(converted, tmp_path / name, parity=report)
    rebuilt = icrewrite.load(path)
    assert type(rebuilt) is type(model) and not rebuilt.training
    assert rebuilt.icrewrite_options == converted.icrewrite_options
    assert_same_tensors(rebuilt.state_dict(), converted.state_dict())
    torch.testing.assert_close(eval_output(rebuilt, x), eval_output(model, x), rtol=1e-4, atol=1e-4)
    assert load_model(path).icrewrite_options == converted.icrewrite_options
    section = read_config(path)["icrewrite"]
    assert section["version"] == icrewrite.__version__ and section["probe"]["input_size"] == [3, 64, 64]
    assert section["parity"]["max_rel_error"] == report.max_rel_error
    assert check(path)[1] <= TOLERANCE


def _rewrite_config(path: Path, change) -> None:
    """Change the icrewrite config a ``.safetensors`` checkpoint holds, as another writer would have."""
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["icrewrite_config"])
    change(config["icrewrite"])
    safetensors.torch.save_file(safetensors.torch.load_file(path), path,
                                metadata={**metadata, "icrewrite_config": json.dumps(config)})


@pytest.mark.parametrize("name", ["ic.safetensors", "ic_folder"])
def test_checkpoint_records_its_plan_and_load_replays_it(tmp_path, model, converted, name, monkeypatch):
    path = save(converted, tmp_path / name)
    recorded = read_config(path)["icrewrite"]["plan"]
    assert recorded == converted.icrewrite_plan and Plan.from_dict(recorded) == icrewrite.plan(model)

    def refuse(*args, **kwargs):
        raise AssertionError("load analysed the model instead of replaying its plan")

    monkeypatch.setattr(sys.modules["icrewrite.rewrite._plan"], "analyse", refuse)
    monkeypatch.setattr(sys.modules["icrewrite.rewrite._apply"], "make_plan", refuse)
    rebuilt = icrewrite.load(path)
    assert_same_tensors(rebuilt.state_dict(), converted.state_dict())
    assert plan_of(rebuilt) == Plan.from_dict(recorded) and rebuilt.icrewrite_options == converted.icrewrite_options
    assert check(path)[1] <= TOLERANCE  # what `icrewrite verify` runs; finetune and export load the same way
    resaved = save(rebuilt, tmp_path / f"again-{name}")
    assert read_config(resaved)["icrewrite"]["plan"] == recorded


def test_checkpoint_without_a_plan_is_converted_by_its_options(tmp_path, converted):
    """As icrewrite wrote them before plans were recorded (tests/data holds such files too)."""
    path = save(converted, tmp_path / "ic.safetensors")
    _rewrite_config(path, lambda section: section.pop("plan"))
    rebuilt = icrewrite.load(path)
    assert_same_tensors(rebuilt.state_dict(), converted.state_dict())
    assert plan_of(rebuilt) == plan_of(converted)  # planned again with the options: the same plan


def test_a_malformed_plan_in_a_checkpoint_is_refused_naming_the_file(tmp_path, converted):
    path = save(converted, tmp_path / "ic.safetensors")
    _rewrite_config(path, lambda section: section["plan"].update(schema=99))
    with pytest.raises(CheckpointError, match="ic.safetensors: plan schema version 99 is not supported"):
        icrewrite.load(path)


@pytest.mark.skipif(not TIMM_READS_LOCAL_DIR, reason="timm reads local-dir: folders from 1.0.16 on")
def test_folder_layout_is_readable_by_timm(tmp_path, converted):
    save(converted, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"] == ARCH and config["model_args"]["num_classes"] == 10
    plain = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=False)
    assert type(plain) is type(converted) and plain.num_classes == 10


def test_load_model_records_the_builder_arguments(tmp_path):
    """timm >= 1.0.31 records them itself; load_model does on every timm, so save/load round trips."""
    converted = icrewrite.convert(load_model(ARCH, stem_width=16, **SMALL))
    path = save(converted, tmp_path / "ic.safetensors")
    assert read_config(path)["model_args"]["stem_width"] == 16 and read_config(path)["model_args"]["num_classes"] == 10
    assert_same_tensors(icrewrite.load(path).state_dict(), converted.state_dict())


def test_save_takes_builder_arguments_the_model_does_not_show(tmp_path):
    converted = icrewrite.convert(timm.create_model(ARCH, stem_width=16, **SMALL))
    path = save(converted, tmp_path / "ic.safetensors", model_args={"stem_width": 16})
    assert_same_tensors(icrewrite.load(path).state_dict(), converted.state_dict())


@pytest.mark.skipif(TIMM_RECORDS_MODEL_ARGS, reason="timm >= 1.0.31 records the builder arguments itself")
def test_save_refuses_a_config_that_would_rebuild_another_architecture(tmp_path):
    """timm <= 1.0.30 keeps no record of ``stem_width=16``: the file would not load, so none is written."""
    converted = icrewrite.convert(timm.create_model(ARCH, stem_width=16, **SMALL))
    with pytest.raises(CheckpointError, match=r"would rebuild another architecture \((the config to save: )?(the plan was made for|"
                                              r".*shape mismatches).*pass them as save\(\.\.\., model_args="):
        save(converted, tmp_path / "ic.safetensors")
    assert not (tmp_path / "ic.safetensors").exists()


def test_save_refuses_to_overwrite_without_force(tmp_path, converted):
    path = save(converted, tmp_path / "ic.safetensors")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="output exists.*--force"):
        save(icrewrite.convert(make_model()), path)
    assert path.read_bytes() == before
    save(converted, path, force=True)


def test_failed_write_leaves_no_partial_output(tmp_path, converted, monkeypatch):
    def fail_midway(model, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save(converted, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary


def test_tied_weights_are_saved_once_and_restored(tmp_path, model):
    tied = make_model()
    tied.load_state_dict(model.state_dict())
    tied.layer1[0].conv2.weight = tied.layer1[0].conv1.weight  # same shape: share one tensor
    converted = icrewrite.convert(tied.eval())
    path = save(converted, tmp_path / "tied.safetensors")
    x = example_input(model)
    torch.testing.assert_close(eval_output(icrewrite.load(path), x), eval_output(tied, x), rtol=1e-4, atol=1e-4)


def test_check_detects_changed_weights(tmp_path, converted):
    path = save(converted, tmp_path / "ic.safetensors")
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(path)
    tensors["fc.weight"] = tensors["fc.weight"] * 2
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    assert check(path)[1] > TOLERANCE


def test_load_errors_name_the_problem(tmp_path, model, converted):
    with pytest.raises(CheckpointError, match="nothing.safetensors: no such file or folder"):
        icrewrite.load(tmp_path / "nothing.safetensors")
    plain = tmp_path / "plain.safetensors"
    _write_format(plain, "safetensors", model.state_dict())
    with pytest.raises(CheckpointError, match="plain.safetensors: not written by icrewrite"):
        icrewrite.load(plain)
    path = save(converted, tmp_path / "ic.safetensors")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="ic.safetensors: not a readable checkpoint"):
        icrewrite.load(path)


def test_save_needs_a_timm_model(tmp_path):
    with pytest.raises(CheckpointError, match="only models made by timm.create_model"):
        save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
