"""Each example script runs end to end in its tiny configuration, as a user would run it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_data import write_digits_folder

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """The environment of a script run as a user would: this repository first, then the caller's
    path (which may name the timm under test), one thread."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_example(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_convert_and_inspect() -> None:
    out = run_example("convert_and_inspect.py", "--tiny")
    assert "insert" in out.lower()  # the plan lists the IC insertions
    assert "is now IC" in out and "isinstance: True" in out
    assert "'p': 0.05" in out


def test_checkpoint_finetune_export(tmp_path: Path) -> None:
    out = run_example("checkpoint_finetune_export.py", "--tiny", "--work", str(tmp_path))
    for command in ("icrewrite convert", "icrewrite finetune", "icrewrite export"):
        assert command in out
    assert {"weights.pth", "resnet10t_ic.safetensors", "resnet10t_ic.onnx", "run"} <= {
        p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_compare_on_imagefolder(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "images", per_class=12, classes=3)
    out = run_example("compare_on_imagefolder.py", str(data), "--tiny", "--batch-size", "4", "--out",
                      str(tmp_path / "out"))
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["baseline", "ic:p=0.05"]
    assert "ic:p=0.05 against baseline, final test accuracy (points): " in out
    assert (tmp_path / "out" / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "out" / "report.md").is_file()


def test_register_custom_layers() -> None:
    out = run_example("register_custom_layers.py")
    before, after = out.split("after registering:")
    assert "register_weight_layer(__main__.ScaledConv)" in before and "insert-ic  attention.qkv" not in before
    assert "insert-ic             conv" in after and "route-through-module  attention" in after
    assert "ICScaledConv is a ScaledConv: True" in out
    assert "placement and function checks at 4 sites: pass" in out
