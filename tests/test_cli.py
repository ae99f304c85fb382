"""The ``icrewrite`` command line, driven as users drive it.

Two tests run it as a subprocess (``python -m icrewrite.cli``: exit codes, what reaches
the terminal); the others call ``main(argv)`` in-process, the same code path without
paying torch's and timm's import for every case.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch

import icrewrite
from icrewrite.checkpoint import example_input
from icrewrite.cli import main
from icrewrite.layers import IC
from icrewrite.testing import randomize_norms

from pickles import Marker, Metadata

ARCH = "resnet10t"  # timm's smallest ResNet (4.9M parameters), in every timm version
MODEL_ARGS = [ARCH, "--num-classes", "10"]


@pytest.fixture(scope="module")
def original() -> torch.nn.Module:
    return randomize_norms(timm.create_model(ARCH, num_classes=10), seed=2).eval()


def icrewrite_cli(*args: str | Path) -> subprocess.CompletedProcess:
    """Run the command line in a fresh process, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "icrewrite.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def run_main(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    """The error lines (progress lines start with '...')."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_function(converted_path: Path, original: torch.nn.Module) -> None:
    x = example_input(original)
    with torch.no_grad():
        torch.testing.assert_close(icrewrite.load(converted_path)(x), original(x), rtol=1e-4, atol=1e-4)


WRITERS = {
    "w.safetensors": lambda sd, path: safetensors.torch.save_file(sd, path),
    "w.pth": lambda sd, path: torch.save(sd, path),
    "train.pth.tar": lambda sd, path: torch.save(  # timm train.py: DDP prefixes, epoch, argparse args
        {"epoch": 3, "args": argparse.Namespace(lr=0.1), "state_dict": {f"module.{k}": v for k, v in sd.items()}},
        path),
    "pytorch_model.bin": lambda sd, path: torch.save(sd, path),
    "ema.pth": lambda sd, path: torch.save(
        {"state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}, "state_dict_ema": sd}, path),
}


def write_weights(tmp_path: Path, name: str, model: torch.nn.Module) -> Path:
    path = tmp_path / name
    WRITERS[name](model.state_dict(), path)
    return path


# --- as a subprocess -------------------------------------------------------------------------


def test_convert_as_a_user_then_verify(tmp_path, original, capsys):
    weights = write_weights(tmp_path, "train.pth.tar", original)
    out = tmp_path / "resnet_ic"
    result = icrewrite_cli("convert", *MODEL_ARGS, "--checkpoint", weights, "-o", out, "--verify")
    assert result.returncode == 0, result.stderr
    assert "function preserved" in result.stdout and f"wrote {out}" in result.stdout
    assert "... converting" in result.stderr  # progress goes to stderr, results to stdout
    assert_same_function(out, original)
    code, stdout, _ = run_main(capsys, "verify", out, "--original", ARCH, "--checkpoint", weights)
    assert code == 0 and "reproduced" in stdout and stdout.rstrip().endswith("verify: ok")


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker, evil, out = tmp_path / "pwned", tmp_path / "evil.pth", tmp_path / "out"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Marker(marker)}, evil)
    result = icrewrite_cli("convert", *MODEL_ARGS, "--checkpoint", evil, "-o", out)
    assert result.returncode == 2
    assert error_lines(result.stderr) == [f"error: {evil}: refused to unpickle: the file would import posix.system, "
                                          "and loading it could run code; nothing from it was executed. Pass "
                                          "--unsafe-pickle (unsafe_pickle=True) only for a file you trust"]
    assert not marker.exists() and not out.exists()


# --- in-process: every format ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_convert_each_format_preserves_function(tmp_path, original, capsys, name):
    weights = write_weights(tmp_path, name, original)
    before = digest(weights)
    out = tmp_path / "ic.safetensors"
    code, stdout, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "-o", out, "--verify")
    assert code == 0, stderr
    assert "function preserved" in stdout
    assert_same_function(out, original)
    assert digest(weights) == before  # the input is never modified


def test_help_lists_commands_each_with_an_example(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    for command in ("plan", "convert", "verify"):
        assert command in listing
        assert main([command, "--help"]) == 0
        assert f"example:\n  icrewrite {command} " in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"icrewrite {icrewrite.__version__}"


def test_plan_prints_the_table_and_json(capsys):
    code, table, _ = run_main(capsys, "plan", *MODEL_ARGS, "--exclude", "layer1.*")
    expected = icrewrite.plan(timm.create_model(ARCH, num_classes=10), exclude=("layer1.*",))
    assert code == 0 and table.strip() == str(expected)
    code, text, _ = run_main(capsys, "plan", *MODEL_ARGS, "--exclude", "layer1.*", "--json")
    assert code == 0 and text.strip() == json.dumps(expected.to_dict(), indent=2)


def test_plan_written_as_json_then_converted_by(tmp_path, original, capsys):
    weights = write_weights(tmp_path, "w.safetensors", original)
    plan_file, out = tmp_path / "plans" / "resnet.json", tmp_path / "ic.safetensors"
    code, stdout, stderr = run_main(capsys, "plan", *MODEL_ARGS, "--exclude", "layer1.*", "--json", plan_file)
    expected = icrewrite.plan(original, exclude=("layer1.*",))
    assert code == 0, stderr
    assert stdout == f"{expected}\nwrote {plan_file}\n"
    assert icrewrite.Plan.from_dict(json.loads(plan_file.read_text())) == expected
    before = digest(plan_file)
    code, _, stderr = run_main(capsys, "plan", *MODEL_ARGS, "--json", plan_file)
    assert code == 2 and error_lines(stderr) == [f"error: output exists: {plan_file}; pass --force (force=True) to "
                                                 "overwrite it"]
    assert digest(plan_file) == before and not list(plan_file.parent.glob(".*.tmp"))

    code, stdout, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "--plan", plan_file,
                                    "-o", out, "--verify")
    assert code == 0, stderr
    assert "function preserved" in stdout and f"by the plan in {plan_file}" in stderr
    assert_same_function(out, original)
    assert icrewrite.rewrite.plan_of(icrewrite.load(out)) == expected
    code, _, _ = run_main(capsys, "plan", *MODEL_ARGS, "--json", plan_file, "--force")  # default options now
    assert code == 0 and icrewrite.Plan.from_dict(json.loads(plan_file.read_text())) == icrewrite.plan(original)


def test_convert_by_a_plan_refuses_options_and_bad_files(tmp_path, original, capsys):
    plan_file, out = tmp_path / "plan.json", tmp_path / "ic.safetensors"
    plan_file.write_text(json.dumps(icrewrite.plan(original).to_dict()))
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--plan", plan_file, "--p", "0.1", "--no-head",
                               "-o", out)
    assert code == 2 and error_lines(stderr) == [
        "error: --plan converts with the plan's own options; --p, --no-head cannot be given with it (make the plan "
        "with them: `icrewrite plan MODEL ... --json PATH`)"]
    code, _, stderr = run_main(capsys, "convert", "test_efficientnet", "--plan", plan_file, "-o", out)
    assert code == 2 and "the plan was made for resnet10t" in error_lines(stderr)[0]
    plan_file.write_text("{not json")
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--plan", plan_file, "-o", out)
    assert code == 2 and error_lines(stderr)[0].startswith(f"error: {plan_file}: not a JSON plan")
    plan_file.write_text(json.dumps({"schema": 7}))
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--plan", plan_file, "-o", out)
    assert code == 2 and error_lines(stderr) == [f"error: {plan_file}: plan schema version 7 is not supported: this "
                                                 "icrewrite reads versions 1, 2"]
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--plan", tmp_path / "none.json", "-o", out)
    assert code == 2 and error_lines(stderr) == [f"error: {tmp_path / 'none.json'}: cannot read the plan (No such "
                                                 "file or directory)"]
    assert not out.exists()


def test_calibrate_on_digits(tmp_path, original, capsys):
    weights = write_weights(tmp_path, "w.safetensors", original)
    out = tmp_path / "ic.safetensors"
    code, stdout, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "-o", out,
                                    "--calibrate", "digits", "--calibrate-batches", "1", "--verify")
    assert code == 0, stderr
    assert "calibrating" in stderr and "function preserved" in stdout
    calibrated = [m.norm.running_mean for m in icrewrite.load(out).modules() if isinstance(m, IC)]
    data_free = [m.norm.running_mean for m in icrewrite.convert(original).modules() if isinstance(m, IC)]
    assert len(calibrated) == len(data_free) > 0
    assert not all(torch.allclose(a, b) for a, b in zip(calibrated, data_free))
    assert_same_function(out, original)


# --- in-process: bad input ---------------------------------------------------------------------


def _truncated(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = write_weights(tmp_path, "w.pth", model)
    path.write_bytes(path.read_bytes()[:5000])
    return path


def _corrupt(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


def _other_architecture(tmp_path: Path, model: torch.nn.Module) -> Path:
    return write_weights(tmp_path, "w.pth", timm.create_model("test_efficientnet", num_classes=10))


def _missing_keys(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = tmp_path / "w.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("layer2.")}, path)
    return path


def _unexpected_keys(tmp_path: Path, model: torch.nn.Module) -> Path:
    path = tmp_path / "w.pth"
    torch.save({**model.state_dict(), "aux.weight": torch.zeros(3), "aux.bias": torch.zeros(3)}, path)
    return path


def _shape_mismatch(tmp_path: Path, model: torch.nn.Module) -> Path:
    return write_weights(tmp_path, "w.pth", timm.create_model(ARCH, num_classes=7))


BAD_CHECKPOINTS = {
    "truncated": (_truncated, r"w.pth: not a readable checkpoint, truncated or corrupt \(\w+Error"),
    "corrupt": (_corrupt, r"w.safetensors: not a readable checkpoint, truncated or corrupt \(SafetensorError: "),
    "other-architecture": (_other_architecture, r"w.pth does not fit resnet10t: .* a checkpoint for another arch"),
    "missing-keys": (_missing_keys, r"w.pth does not fit resnet10t: \d+ missing keys \(layer2.0.conv1.weight, "
                                    r"layer2.0.bn1.weight, layer2.0.bn1.bias and \d+ more\)$"),
    "unexpected-keys": (_unexpected_keys, r"w.pth does not fit resnet10t: 2 unexpected keys \(aux.weight, "
                                          r"aux.bias\)$"),
    "shape-mismatch": (_shape_mismatch, r"w.pth does not fit resnet10t: 2 shape mismatches \(fc.weight: file "
                                        r"\(7, 512\), model \(10, 512\), fc.bias: file \(7,\), model \(10,\)\); only "
                                        r"the classifier differs: the file has 7 classes \(--num-classes 7\)$"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_one_line_exit_2(tmp_path, original, capsys, case):
    make, pattern = BAD_CHECKPOINTS[case]
    weights = make(tmp_path, original)
    before = digest(weights)
    out = tmp_path / "out"
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "-o", out)
    assert code == 2
    [line] = error_lines(stderr)
    assert re.search(pattern, line), line
    assert not out.exists() and digest(weights) == before


def test_unknown_model_name_suggests_timm_names(tmp_path, capsys):
    # resnt50: the same five suggestions in every timm version (resnt18's fifth differs: resnet61q on timm 1.0.9)
    code, _, stderr = run_main(capsys, "convert", "resnt50", "-o", tmp_path / "out")
    assert code == 2
    assert error_lines(stderr) == ["error: unknown timm model 'resnt50'; did you mean resnet50, resnet50t, "
                                   "resnet50s, resnet50d, resnet50c?"]


def test_debug_shows_the_traceback(tmp_path, capsys):
    code = main(["--debug", "plan", "resnt18"])
    stderr = capsys.readouterr().err
    assert code == 2 and "Traceback" in stderr and "CheckpointError: unknown timm model" in stderr


def test_existing_output_is_kept_without_force(tmp_path, original, capsys):
    weights = write_weights(tmp_path, "w.pth", original)
    out = tmp_path / "out"
    assert run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "-o", out)[0] == 0
    before = {p.name: digest(p) for p in out.iterdir()}
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "-o", out, "--p", "0.1")
    assert code == 2 and error_lines(stderr) == [f"error: output exists: {out}; pass --force (force=True) "
                                                 "to overwrite it"]
    assert {p.name: digest(p) for p in out.iterdir()} == before
    assert run_main(capsys, "convert", *MODEL_ARGS, "-o", out, "--p", "0.1", "--force")[0] == 0
    assert icrewrite.load(out).icrewrite_options["p"] == 0.1


def test_failed_conversion_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "-o", out, "--p", "1.5")
    assert code == 2 and error_lines(stderr) == ["error: p must be in [0, 1), got 1.5"]
    assert list(tmp_path.iterdir()) == []


def test_unsafe_pickle_is_opt_in_and_loudly_warned(tmp_path, original, capsys):
    weights = tmp_path / "w.pth"
    torch.save({"state_dict": original.state_dict(), "meta": Metadata()}, weights)
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "-o", tmp_path / "a")
    assert code == 2 and "refused to unpickle" in error_lines(stderr)[0]
    code, _, stderr = run_main(capsys, "convert", *MODEL_ARGS, "--checkpoint", weights, "-o", tmp_path / "b",
                               "--unsafe-pickle")
    assert code == 0 and f"warning: unsafe pickle: loading {weights} with weights_only=False runs any code" in stderr


def test_verify_fails_on_a_changed_file(tmp_path, original, capsys):
    out = tmp_path / "ic.safetensors"
    icrewrite.save(icrewrite.convert(original), out)
    with safetensors.safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(out)
    tensors["fc.bias"] = tensors["fc.bias"] + 1.0
    safetensors.torch.save_file(tensors, out, metadata=metadata)
    code, stdout, _ = run_main(capsys, "verify", out)
    assert code == 1 and "DIFFERENT" in stdout and stdout.rstrip().endswith("verify: FAILED")
