"""What IC blocks run on CUDA (icrewrite.layers.fast.cuda_path), checked on CPU.

CPU tensors are let onto the Triton path (``_TRITON_DEVICES``), whose kernels are either Triton's own (which cannot
launch on CPU tensors without the interpreter: a real launch failure), emulated in torch (the same contract: the mask
a function of the seed and the memory-order offset), or emulations made to fail in one way each. The kernels
themselves are checked against the reference in tests/triton_cases.py (interpreted here, compiled on CUDA).
"""
from __future__ import annotations

import contextlib
import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import icrewrite.layers
from icrewrite.errors import ICRewriteError
from icrewrite.layers import IC, attach_ic
from icrewrite.layers import fast as fast_ic

pytest.importorskip("triton")  # torch builds without it (macOS, CPU-only wheels) have no Triton path to choose
from icrewrite.layers import triton_ic  # noqa: E402
from icrewrite.testing import randomize_norms

P = 0.3


@pytest.fixture(autouse=True)
def cpu_as_cuda(monkeypatch):
    """CPU tensors may take the Triton path; the setting, the self-checks and the warnings start afresh."""
    monkeypatch.setattr(fast_ic, "_TRITON_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(fast_ic, "_WARNED", set())
    monkeypatch.setattr(fast_ic, "_NATIVE_NUMEL", -1)
    monkeypatch.delenv(fast_ic.CUDA_PATH_VARIABLE, raising=False)
    fast_ic.set_cuda_path(None)
    yield
    fast_ic.set_cuda_path(None)


class Emulated:
    """The kernels of icrewrite.layers.triton_ic in torch, counting their calls; ``scale_error`` and ``p_error``
    make them wrong, ``fail`` names one that raises."""

    def __init__(self, scale_error: float = 0.0, p_error: float = 0.0, fail: str | None = None) -> None:
        self.scale_error, self.p_error, self.fail = scale_error, p_error, fail
        self.calls = {"normalise_dropout": 0, "drop": 0}

    def keep(self, like: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(seed) % 2**63)
        return torch.rand(like.numel(), generator=generator) >= p + self.p_error

    def normalise_dropout(self, x, scale, shift, seed, p):
        self.calls["normalise_dropout"] += 1
        if self.fail == "normalise_dropout":
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = (x.to(scale.dtype) * scale.view(shape) * (1 + self.scale_error) + shift.view(shape)).to(x.dtype)
        out = torch.empty_like(x).copy_(out)
        fast_ic._flat(out).mul_(self.keep(out, seed, p))
        return out

    def drop(self, grad, seed, p):
        self.calls["drop"] += 1
        if self.fail == "drop":
            raise RuntimeError("triton launch failed")
        out = grad.clone()
        fast_ic._flat(out).mul_(self.keep(out, seed, p))
        return out


def emulate(monkeypatch, kernels: Emulated) -> Emulated:
    monkeypatch.setattr(triton_ic, "normalise_dropout", kernels.normalise_dropout)
    monkeypatch.setattr(triton_ic, "drop", kernels.drop)
    return kernels


def block(features: int = 6) -> IC:
    return randomize_norms(IC(features, P), seed=1).train()


def check_reference_step(ic: IC, x: torch.Tensor) -> None:
    """A training step of ``ic`` computes what the reference modules compute with its mask."""
    reference = copy.deepcopy(ic)
    reference.fast = False
    x = x.detach().requires_grad_()
    y = ic(x)
    keep = (y != 0).to(y.dtype)
    expected = reference.norm(x) * keep / (1 - P)
    torch.testing.assert_close(y, expected)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, ic.norm.weight, ic.norm.bias], grad)
    want = torch.autograd.grad(expected, [x, reference.norm.weight, reference.norm.bias], grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ic.norm.running_var, reference.norm.running_var)


def test_the_default_on_cuda_is_the_reference(monkeypatch):
    kernels = emulate(monkeypatch, Emulated())
    assert fast_ic.cuda_path() == "reference"
    x = torch.randn(4, 6, 5, 5)
    assert not fast_ic._uses_triton(x)
    block()(x).sum().backward()
    assert kernels.calls == {"normalise_dropout": 0, "drop": 0}


def test_the_environment_is_read_when_a_block_decides_and_the_setting_overrides_it(monkeypatch):
    kernels = emulate(monkeypatch, Emulated())
    x = torch.randn(4, 6, 5, 5)
    monkeypatch.setenv(fast_ic.CUDA_PATH_VARIABLE, "triton")  # after import
    assert fast_ic.cuda_path() == "triton" and fast_ic._uses_triton(x)
    block()(x)
    assert kernels.calls["normalise_dropout"] == 1
    fast_ic.set_cuda_path("reference")
    assert fast_ic.cuda_path() == "reference" and not fast_ic._uses_triton(x)
    fast_ic.set_cuda_path(None)
    monkeypatch.setenv(fast_ic.CUDA_PATH_VARIABLE, "reference")
    assert not fast_ic._uses_triton(x)


def test_settings_that_are_not_paths():
    with pytest.raises(ICRewriteError, match="one of reference, triton, auto"):
        fast_ic.set_cuda_path("fast")


def test_an_unknown_environment_value_means_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setenv(fast_ic.CUDA_PATH_VARIABLE, "tritonn")
    with pytest.warns(RuntimeWarning, match="ICREWRITE_CUDA_IC='tritonn' is not one of") as caught:
        assert fast_ic.cuda_path() == "reference"
        assert fast_ic.cuda_path() == "reference"
    assert len(caught) == 1


def test_auto_takes_kernels_that_pass_the_self_check(monkeypatch):
    kernels = emulate(monkeypatch, Emulated())
    fast_ic.set_cuda_path("auto")
    x = torch.randn(4, 6, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fast_ic._uses_triton(x)
    checked = dict(kernels.calls)
    assert checked["normalise_dropout"] >= 1 and checked["drop"] >= 1  # the self-check ran both
    assert fast_ic._uses_triton(x) and kernels.calls == checked  # once per device, dtype and layout
    assert fast_ic._uses_triton(x.contiguous(memory_format=torch.channels_last))
    assert kernels.calls != checked  # another layout: checked again
    check_reference_step(block(), x)


def test_triton_runs_the_kernels_unchecked(monkeypatch):
    emulate(monkeypatch, Emulated())
    monkeypatch.setattr(fast_ic, "_self_check", lambda *args: pytest.fail("no self-check under 'triton'"))
    fast_ic.set_cuda_path("triton")
    check_reference_step(block(), torch.randn(4, 6, 5, 5))


def break_import(monkeypatch):
    """Triton and the kernels' module as if not installed."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "icrewrite.layers.triton_ic", None)
    monkeypatch.delattr(icrewrite.layers, "triton_ic", raising=False)


FAILURES = {
    # what goes wrong: (how it is made to, what the warning says)
    "import": (break_import, "cannot be imported"),
    "compile": (lambda mp: emulate(mp, Emulated(fail="normalise_dropout")), "Failed to find C compiler"),
    "launch": (lambda mp: None, "self-check failed"),  # Triton's own kernels on CPU tensors, not interpreted
    "backward launch": (lambda mp: emulate(mp, Emulated(fail="drop")), "triton launch failed"),
    "values": (lambda mp: emulate(mp, Emulated(scale_error=0.01)), "forward values differ"),
    "drop rate": (lambda mp: emulate(mp, Emulated(p_error=-0.1)), "drops 0.1"),
}


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("path", ["auto", "triton"])
def test_a_failing_triton_path_means_the_reference_with_one_warning(monkeypatch, failure, path):
    """Under "auto" every failure gives the reference, with one warning line saying why; "triton" skips the
    self-check, so only a failed import falls back there."""
    make_fail, reason = FAILURES[failure]
    make_fail(monkeypatch)
    fast_ic.set_cuda_path(path)
    x = torch.randn(4, 6, 5, 5)
    if path == "triton" and failure != "import":
        assert fast_ic._uses_triton(x)
        return
    with pytest.warns(RuntimeWarning, match=reason) as caught:
        assert not fast_ic._uses_triton(x)
        ic = block()
        check_reference_step(ic, x)
        check_reference_step(ic, x)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "run the reference BatchNorm and Dropout" in message


def test_a_kernel_that_fails_after_the_self_check_falls_back_in_that_step(monkeypatch):
    kernels = emulate(monkeypatch, Emulated())
    fast_ic.set_cuda_path("auto")
    x = torch.randn(4, 6, 5, 5)
    assert fast_ic._uses_triton(x)
    kernels.fail = "normalise_dropout"
    ic = block()
    with pytest.warns(RuntimeWarning, match="from now on: the Triton kernels failed"):
        check_reference_step(ic, x)  # this step: the positions path
    assert ic.norm.num_batches_tracked == 1
    assert not fast_ic._uses_triton(x)  # later steps: the reference


def test_a_kernel_failure_under_triton_is_raised(monkeypatch):
    emulate(monkeypatch, Emulated(fail="normalise_dropout"))
    fast_ic.set_cuda_path("triton")
    with pytest.raises(RuntimeError, match="C compiler"):
        block()(torch.randn(4, 6, 5, 5))


@pytest.mark.parametrize("fused", [False, True])
def test_backward_follows_the_mask_that_forward_drew(monkeypatch, fused):
    """The path is decided in forward and recorded: changing the setting before backward changes nothing."""
    kernels = emulate(monkeypatch, Emulated())
    module = (randomize_norms(attach_ic(nn.Conv2d(6, 4, 3), IC(6, P)), seed=1).train() if fused else block())
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    for forward_path, backward_path in (("triton", "reference"), ("reference", "triton")):
        fast_ic.set_cuda_path(forward_path)
        twin = copy.deepcopy(module)
        torch.manual_seed(0)
        out = module(x)
        fast_ic.set_cuda_path(backward_path)
        drops = kernels.calls["drop"]
        grad, = torch.autograd.grad(out.sum(), x)
        assert kernels.calls["drop"] == drops + (forward_path == "triton")
        fast_ic.set_cuda_path(forward_path)  # the same step again, one path throughout
        torch.manual_seed(0)
        again = twin(x)
        torch.testing.assert_close(again, out)
        torch.testing.assert_close(torch.autograd.grad(again.sum(), x)[0], grad)


@pytest.mark.parametrize("fused", [False, True])
def test_torch_compile_traces_the_kernels_and_the_seed_into_its_graphs(fused):
    """Dynamo and AOTAutograd trace the Triton path (Triton's own kernels, in fake tensors): one graph, the seed
    drawn by an op in it, the kernels as user Triton kernels that Inductor sees (forward: the output; backward: the
    mask on the gradient and, fused, the rebuilt output). The graphs are not run (the kernels cannot launch on CPU
    tensors)."""
    from torch._dynamo.backends.common import aot_autograd

    fast_ic.set_cuda_path("triton")
    torch._dynamo.reset()
    graphs = []

    class Traced(Exception):
        pass

    def record(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            raise Traced

        return run

    module = (randomize_norms(attach_ic(nn.Conv2d(6, 4, 3), IC(6, P)), seed=1).train() if fused else block())
    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    # Backward is traced with forward; compiled at once where torch can be told to (else at the first backward).
    eager_backward = "force_non_lazy_backward_lowering" in torch._functorch.config._config
    lowering = (torch._functorch.config.patch(force_non_lazy_backward_lowering=True) if eager_backward
                else contextlib.nullcontext())
    with pytest.raises(Traced), lowering:
        compiled(torch.randn(4, 6, 5, 5, requires_grad=True))
    assert any("randint" in str(node.target) for node in graphs[0].graph.nodes)
    assert "_normalise_dropout_kernel" in kernels_in(graphs[0])
    if eager_backward:
        backward = kernels_in(graphs[1])
        assert "_drop_kernel" in backward and ("_normalise_dropout_kernel" in backward) == fused  # the rebuilt output


def kernels_in(gm: torch.fx.GraphModule) -> set[str]:
    """The names of the user Triton kernels that a graph launches."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    return {kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__ for node in gm.graph.nodes
            if "triton_kernel_wrapper" in str(node.target)}
