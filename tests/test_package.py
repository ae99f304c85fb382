"""The package as users meet it: public names, old import paths, and a core install without extras."""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
from torch import nn

import icrewrite

EXTRAS = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn")


def run_python(code: str, *blocked: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter in which the modules ``blocked`` cannot be imported."""
    prelude = f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("name", icrewrite.__all__)
def test_every_public_name_is_importable(name):
    assert getattr(icrewrite, name) is not None


def test_ic_layer_classes_are_importable_by_name():
    from icrewrite.layers import ICConv2d, ICLinear, ic_class

    assert ICConv2d is ic_class(nn.Conv2d) and issubclass(ICConv2d, nn.Conv2d)
    assert ICLinear is ic_class(nn.Linear)
    with pytest.raises(ImportError):
        from icrewrite.layers import ICNoSuchLayer  # noqa: F401


@pytest.mark.parametrize("old, new, name", [
    ("icrewrite.attention", "icrewrite.layers.attention", "RoutedMultiheadAttention"),
    ("icrewrite.fold", "icrewrite.layers.border", "BorderCorrectedConv2d"),
    ("icrewrite.fast_ic", "icrewrite.layers.fast", "norm_dropout_layer"),
])
def test_modules_of_0_1_0_still_resolve_for_pickles(old, new, name):
    assert getattr(importlib.import_module(old), name) is getattr(importlib.import_module(new), name)


def test_the_core_does_not_import_the_extras():
    result = run_python("""
        import timm, icrewrite
        model = icrewrite.convert(timm.create_model("test_byobnet", num_classes=4))
        print(sorted(m for m in ("onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn") if m in sys.modules))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_core_converts_saves_and_loads_without_the_extras(tmp_path):
    result = run_python(f"""
        import timm, torch, icrewrite
        model = timm.create_model("test_byobnet", num_classes=4).eval()
        converted = icrewrite.convert(model)
        print(icrewrite.verify(model, converted, torch.randn(2, 3, 64, 64)).ok)
        icrewrite.save(converted, {str(tmp_path / "m.safetensors")!r})
        print(type(icrewrite.load({str(tmp_path / "m.safetensors")!r})).__name__)
        try:
            icrewrite.export_onnx
        except icrewrite.ICRewriteError as err:
            print(err)
    """, *EXTRAS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True", "ByobNet", "onnx is not installed; it comes with pip install "
                                          "'icrewrite[onnx]'"]


@pytest.mark.parametrize("args, extra", [(["export", "test_byobnet", "-o", "m.onnx"], "onnx"),
                                         (["finetune", "test_byobnet", "--data", "digits", "-o", "run"], "train")])
def test_the_cli_names_the_missing_extra_in_one_line(tmp_path, args, extra):
    result = run_python(f"""
        import os
        os.chdir({str(tmp_path)!r})
        from icrewrite.cli import main
        sys.exit(main({args!r}))
    """, *EXTRAS)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]  # progress, library warnings aside
    assert len(errors) == 1 and "Traceback" not in result.stderr  # one line, no traceback
    assert errors[0].startswith("error: ") and errors[0].endswith(f"pip install 'icrewrite[{extra}]'")
