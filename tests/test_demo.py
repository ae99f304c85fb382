"""``icrewrite demo --quick`` end to end: a comparison over seeds, its verdict and the ONNX export."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import icrewrite
from icrewrite.train.data import DigitsDataset
from icrewrite.apps.demo import QUICK, run_demo
from icrewrite.errors import ICRewriteError
from icrewrite.layers import ICWeightLayer

from test_examples import subprocess_env



def test_demo_quick_runs_end_to_end(tmp_path: Path) -> None:
    # bytes, not text: text mode would turn the progress bar's carriage returns into newlines
    done = subprocess.run([sys.executable, "-m", "icrewrite.cli", "demo", "--quick", "--out", str(tmp_path)],
                          env=subprocess_env(), capture_output=True, timeout=600)
    done.stdout, done.stderr = done.stdout.decode(), done.stderr.decode()
    assert done.returncode == 0, done.stderr[-3000:]
    # One screen: the bar redraws one line (carriage returns, not newlines); no per-epoch lines.
    assert (done.stdout + done.stderr).count("\n") <= 24 and "train loss" not in done.stderr
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["baseline", "ic"]
    verdict = next(line for line in done.stdout.splitlines() if line.startswith("ic against baseline"))
    assert any(word in verdict for word in (": better", ": worse", ": not resolved at 2 seeds"))
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")
    assert "| ic |" in (tmp_path / "report.md").read_text()

    # The two variants trained different networks: the IC one has an IC block before its weight layers.
    original = icrewrite.load(tmp_path / "seed-0" / "baseline" / "last.safetensors")
    ic = icrewrite.load(tmp_path / "seed-0" / "ic" / "last.safetensors")
    assert not any(isinstance(m, ICWeightLayer) for m in original.modules())
    assert any(isinstance(m, ICWeightLayer) for m in ic.modules())

    # The ONNX file computes what the trained IC model computes, on real digits.
    images = torch.stack([DigitsDataset("test", QUICK.img_size)[i][0] for i in range(8)])
    session = onnxruntime.InferenceSession(str(tmp_path / "ic.onnx"))
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        torch_logits = ic(images).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, rtol=1e-4, atol=1e-4 * np.abs(torch_logits).max())


def test_demo_refuses_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ICRewriteError, match="not empty"):
        run_demo(tmp_path, QUICK)
    assert (tmp_path / "notes.txt").read_text() == "mine"
