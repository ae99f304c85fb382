"""Every expected failure of the command line and the Python API is one line (exit 2 on the
command line), found before any work, with nothing written; tracebacks are for bugs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import icrewrite
from icrewrite.cli import describe_error, main
from icrewrite.errors import ConversionError, ICRewriteError

MODEL = ["resnet10t", "--num-classes", "4"]
PROGRESS_BAR = re.compile(r"\[\d\d:\d\d")  # tqdm's, on stderr


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_error_line(code: int, stderr: str, expected: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line and not PROGRESS_BAR.search(line)]
    errors = [line for line in lines if line.startswith("error:")]
    others = [line for line in lines if not line.startswith(("error:", "...", "warning:"))]
    assert len(errors) == 1 and not others, stderr
    assert expected in errors[0], errors[0]


def _plain_file(folder: Path) -> str:
    (folder / "plain").write_text("mine")
    return "plain"


def _folder(folder: Path, name: str) -> str:
    (folder / name).mkdir()
    (folder / name / "keep").write_text("mine")
    return name


CASES = {  # name: (argv, with {x} the prepared path, the expected part of the error line)
    "plain file as a folder output": (lambda d: ["convert", *MODEL, "-o", _plain_file(d)],
                                      "plain is a file; a folder is written there"),
    "plain file as a folder output, --force": (lambda d: ["convert", *MODEL, "-o", _plain_file(d), "--force"],
                                               "plain is a file; a folder is written there"),
    "--force onto a folder (safetensors)": (
        lambda d: ["convert", *MODEL, "-o", _folder(d, "x.safetensors"), "--force"],
        "x.safetensors is a folder; a file is written there"),
    "--force onto a folder (onnx)": (lambda d: ["export", *MODEL, "-o", _folder(d, "x.onnx"), "--force"],
                                     "x.onnx is a folder; a file is written there"),
    "--force onto a folder (plan json)": (
        lambda d: ["plan", *MODEL, "--json", _folder(d, "p.json"), "--force"], "p.json is a folder"),
    "existing folder without --force": (lambda d: ["convert", *MODEL, "-o", _folder(d, "out")],
                                        "output exists: out; pass --force"),
    "a user's folder with --force": (lambda d: ["convert", *MODEL, "-o", _folder(d, "out"), "--force"],
                                     "out holds other files (keep); it is not replaced"),
    "unwritable folder": (lambda d: ["convert", *MODEL, "-o", "/proc/icrewrite-out"],
                          "cannot write /proc/icrewrite-out: /proc is not writable"),
    "unwritable folder (export)": (lambda d: ["export", *MODEL, "-o", "/proc/m.onnx"], "/proc is not writable"),
    "unwritable folder (plan)": (lambda d: ["plan", *MODEL, "--json", "/proc/p.json"], "/proc is not writable"),
    "unwritable folder (stats png)": (lambda d: ["stats", *MODEL, "--png", "/proc/s.png"], "/proc is not writable"),
    "output below a file": (lambda d: ["convert", *MODEL, "-o", f"{_plain_file(d)}/out"], "plain is a file, not a"),
    "output name too long": (lambda d: ["convert", *MODEL, "-o", "o" * 300], "name too long for the file system"),
    "output name too long (export)": (lambda d: ["export", *MODEL, "-o", "o" * 300 + ".onnx"], "name too long"),
    "model name too long": (lambda d: ["convert", "m" * 300, "-o", "out"], "File name too long"),
    "model path too long": (lambda d: ["verify", "d/" * 3000], "/d/d/d/d/d/d: File name too long"),
    "missing checkpoint": (lambda d: ["convert", *MODEL, "--checkpoint", "w.pth", "-o", "out"], "w.pth: no such file"),
    "folder as a plan": (lambda d: ["convert", *MODEL, "--plan", _folder(d, "plan"), "-o", "out"],
                         "plan: cannot read the plan"),
    "undecodable plan": (lambda d: (d / "p.json").write_bytes(b"\xff\xfe{") and
                         ["convert", *MODEL, "--plan", "p.json", "-o", "out"], "p.json: not a JSON plan"),
    "deeply nested plan": (lambda d: (d / "deep.json").write_text("[" * 100_000) and
                           ["convert", *MODEL, "--plan", "deep.json", "-o", "out"], "deep.json: not a JSON plan"),
    "export --input-size 0 -1 1": (lambda d: ["export", *MODEL, "-o", "m.onnx", "--input-size", "0", "-1", "1"],
                                   "--input-size: must be at least 1, got 0"),
    "--num-classes -1": (lambda d: ["convert", "resnet10t", "--num-classes", "-1", "-o", "out"],
                         "--num-classes: must be at least 1, got -1"),
    "--num-classes x": (lambda d: ["plan", "resnet10t", "--num-classes", "x"],
                        "--num-classes: expected an integer, got 'x'"),
    "--calibrate-batches 0": (lambda d: ["convert", *MODEL, "--calibrate-batches", "0", "-o", "out"],
                              "--calibrate-batches: must be at least 1"),
    "--opset 0": (lambda d: ["export", *MODEL, "-o", "m.onnx", "--opset", "0"], "--opset: must be at least 1"),
    "stats --bins 0": (lambda d: ["stats", *MODEL, "--bins", "0"], "--bins: must be at least 1"),
    "compare --seeds 0": (lambda d: ["compare", *MODEL, "-o", "cmp", "--seeds", "0"], "--seeds: must be at least 1"),
    "compare --mc-samples -1": (lambda d: ["compare", *MODEL, "-o", "cmp", "--mc-samples", "-1"],
                                "--mc-samples: must be at least 0, got -1"),
    "no command": (lambda d: [], "the following arguments are required: COMMAND"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_failure_is_one_line_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    argv, expected = CASES[name]
    argv = argv(tmp_path)
    before = snapshot(tmp_path)
    code, stderr = run(capsys, argv)
    assert_one_error_line(code, stderr, expected)
    assert snapshot(tmp_path) == before


def test_a_read_only_current_folder_is_found_before_the_work(monkeypatch, capsys):
    monkeypatch.chdir("/proc")  # not writable, even by root
    code, stderr = run(capsys, ["convert", *MODEL, "-o", "out"])
    assert_one_error_line(code, stderr, "cannot write out: /proc is not writable")
    assert "... loading" not in stderr  # refused before the model was built


def test_unreadable_images_are_one_line(tmp_path, monkeypatch, capsys):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "data" / cls / f"{i}.png").write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, stderr = run(capsys, ["convert", *MODEL, "--calibrate", "data", "-o", "out"])
    assert_one_error_line(code, stderr, "cannot decode image data/")
    assert snapshot(tmp_path) == before


def test_oserror_becomes_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import icrewrite.cli.verify as verify_command

    def unreadable(args):
        raise PermissionError(13, "Permission denied", "/data/model.safetensors")

    monkeypatch.setattr(verify_command, "run", unreadable)
    code, stderr = run(capsys, ["verify", "x"])
    assert_one_error_line(code, stderr, "error: /data/model.safetensors: Permission denied")

    def bug(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(verify_command, "run", bug)
    with pytest.raises(ZeroDivisionError):  # uncaught: the interpreter prints its traceback, exit 1
        main(["verify", "x"])


def test_describe_error_is_always_one_line():
    assert describe_error(ICRewriteError("a\nb")) == "a b"
    assert describe_error(OSError(36, "File name too long", "x" * 500)).endswith("File name too long")
    assert len(describe_error(OSError(36, "File name too long", "x" * 500))) < 200
    assert describe_error(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")).startswith("cannot decode")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(number=st.one_of(st.integers(max_value=0), st.sampled_from(["", "1.5", "nan", "-inf", "0x10", "1e3", "١"]),
                        st.text(max_size=6)))
def test_counts_and_sizes_accept_only_positive_integers(number, capsys):
    """(capsys is read after each run, so no output carries over between examples.)"""
    number = str(number)
    try:
        value = int(number)
    except ValueError:
        value = None
    if value is not None and value >= 1:
        return  # a valid count: covered by the commands' own tests
    for argv in (["export", *MODEL, "-o", "m.onnx", "--input-size", "3", number, "32"],
                 ["plan", "resnet10t", "--num-classes", number],
                 ["stats", *MODEL, "--batches", number]):
        code, stderr = run(capsys, argv)
        assert_one_error_line(code, stderr, "(see icrewrite ")


# --- the Python API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return timm.create_model("test_efficientnet", num_classes=4).eval()


API_CASES = {
    "a non-module": (lambda m: icrewrite.convert("resnet18"), "convert takes an nn.Module, got str"),
    "a TorchScript module": (lambda m: icrewrite.convert(torch.jit.script(torch.nn.Linear(2, 2))),
                             "convert takes a Python nn.Module, got a TorchScript module"),
    "p as a string": (lambda m: icrewrite.convert(m, p="0.1"), "p must be a number in [0, 1), got '0.1'"),
    "p as a bool": (lambda m: icrewrite.convert(m, p=True), "p must be a number"),
    "exclude None": (lambda m: icrewrite.convert(m, exclude=None), "exclude takes fnmatch patterns or module prefixes"),
    "exclude of numbers": (lambda m: icrewrite.convert(m, exclude=[1]), "exclude takes fnmatch patterns"),
    "calibration of strings": (lambda m: icrewrite.convert(m, calibration=["a", "b"]),
                               "calibration batch 0 is str, not a tensor"),
    "calibration a string": (lambda m: icrewrite.convert(m, calibration="digits"),
                             "calibration must be a tensor or an iterable of batches"),
    "calibration of nothing": (lambda m: icrewrite.convert(m, calibration=[]),
                               "the calibration data yielded no batches"),
    "calibration_batches 0": (lambda m: icrewrite.convert(m, calibration=torch.randn(2, 3, 32, 32),
                                                          calibration_batches=0),
                              "calibration_batches must be a positive integer"),
    "verify on meta": (lambda m: icrewrite.verify(m, m.to("meta"), torch.randn(1, 3, 32, 32)),
                       "verify needs real tensors, but conv_stem.weight is on the meta device"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_arguments_of_the_wrong_kind_are_one_line(model, name):
    call, expected = API_CASES[name]
    import copy
    with pytest.raises(ConversionError) as caught:
        call(copy.deepcopy(model))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_save_of_a_model_on_meta_is_one_line_and_writes_nothing(tmp_path, model):
    import copy
    meta = icrewrite.convert(copy.deepcopy(model)).to("meta")
    with pytest.raises(ICRewriteError, match="save needs real tensors, but .* is on the meta device"):
        icrewrite.save(meta, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_verify_names_nan_weights(model):
    import copy
    converted = icrewrite.convert(copy.deepcopy(model))
    with torch.no_grad():
        converted.conv_head.weight[0, 0] = float("nan")
    report = icrewrite.verify(model, converted, torch.randn(2, 3, 32, 32))
    assert not report.ok
    assert report.non_finite == "NaN or infinite values in the converted model's conv_head.weight"
    assert "FUNCTION CHANGED (NaN or infinite values in the converted model's conv_head.weight)" in str(report)


def test_verify_names_nan_outputs(model):
    import copy
    converted = icrewrite.convert(copy.deepcopy(model))
    x = torch.randn(2, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    report = icrewrite.verify(model, converted, x)
    assert report.non_finite == ("NaN or infinite values in the original model's output; NaN or infinite values in "
                                 "the converted model's output")
