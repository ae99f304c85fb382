"""The Triton kernels of the IC block: tests/triton_cases.py in a fresh process, interpreted on CPU and on CUDA."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_cases.py")


# The cases that compile (torch.compile, CUDA graphs): a separate CUDA test, so that a check can run them apart.
COMPILED = "compiled or cuda_graph"


def run_cases(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``pytest tests/triton_cases.py ARGS`` in a fresh process with ``env`` added to the environment."""
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES), *args],
                          env={**os.environ, **env}, capture_output=True, text=True, cwd=CASES.parents[1])


def test_kernels_match_the_reference_interpreted_on_cpu():
    pytest.importorskip("triton")
    result = run_cases(TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_the_reference_on_cuda():
    result = run_cases("-k", f"not ({COMPILED})")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernels_on_cuda():
    result = run_cases("-k", COMPILED)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
