"""Helpers to test conversions honestly (used by the test suite and the zoo sweep)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .layers import ICBatchNorm, is_weight_layer
from torch.nn.modules.batchnorm import _NormBase


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every norm layer's statistics and affine parameters far from their defaults.

    With default BatchNorm (mean 0, var 1, gamma 1, beta 0) a wrong fold can go unnoticed;
    "function preserved" only means something after this. Works in place, returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return (torch.rand(t.shape, generator=gen) * (high - low) + low).to(t)

    for module in model.modules():
        if isinstance(module, _NormBase) or type(module).__name__.startswith("FrozenBatchNorm"):
            for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.3, 3.0), ("weight", 0.3, 2.0), ("bias", -0.5, 0.5)):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                    t.copy_(rand(t, low, high))
    return model


_WEIGHT_OPS = {
    F.linear: -1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1,
    F.conv_transpose1d: 1, F.conv_transpose2d: 1, F.conv_transpose3d: 1,
}


class _WeightInputRecorder(TorchFunctionMode):
    """Record the input of the first conv/linear call of each weight layer.

    A call is matched to its layer by the identity of the weight tensor or, for layers
    that transform their weight before using it (timm's ``StdConv2d``, ``ScaledStdConv2d``),
    to the weight layer whose ``forward`` is running (``running``, innermost last).
    """

    def __init__(self, owners: dict[int, str], running: list[str]) -> None:
        super().__init__()
        self.owners = owners
        self.running = running
        self.inputs: dict[str, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        feature_dim = _WEIGHT_OPS.get(func)
        if feature_dim is not None and len(args) >= 1:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.owners.get(id(weight)) or (self.running[-1] if self.running else None)
            if name is not None and name not in self.inputs:
                t = args[0].detach().float()
                t = t.transpose(1, -1) if feature_dim == 1 else t
                self.inputs[name] = t.reshape(-1, t.shape[-1])
        return func(*args, **kwargs)


@torch.no_grad()
def weight_layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each weight layer's weight is actually applied to, as ``(samples, features)``.

    Conv and linear calls are intercepted (``TorchFunctionMode``) and matched to layers by
    the identity of the weight tensor (or the layer running them), so the check trusts no
    module names or structure. Runs ``model`` once in its current mode.
    """
    layers = {name: m for name, m in model.named_modules() if is_weight_layer(m)}
    owners = {id(m.weight): name for name, m in layers.items() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    running: list[str] = []

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: running.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        del running[-1]

    handles = [h for name, m in layers.items()
               for h in (m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave))]
    try:
        with _WeightInputRecorder(owners, running) as recorder:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.inputs


@dataclass
class ConversionCheck:
    """Outcome of :func:`check_conversion`; ``failures`` is empty when every invariant holds."""

    model: str
    sites: int = 0
    rel_error: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _normalised(t: torch.Tensor) -> bool:
    """Per-feature batch mean ~0 and variance ~1: a BatchNorm sits right before.

    Features constant over the batch, such as dead ReLUs, normalise to 0 and are excepted,
    as long as most features are alive.
    """
    mean, var = t.mean(0), t.var(0, unbiased=False)
    alive = var > 0.5
    return bool((mean.abs() < 1e-2)[alive].all() and ((var - 1).abs() < 0.05)[alive].all()
                and alive.float().mean() >= 0.5)


def _zero_fraction(t: torch.Tensor) -> float:
    """Fraction of exact zeros, over features that are not zero throughout (dead features)."""
    alive = t[:, (t != 0).any(0)]
    return (alive == 0).float().mean().item() if alive.numel() else 0.0


def check_conversion(model: nn.Module, x: torch.Tensor, *, seed: int = 0, **options) -> ConversionCheck:
    """Convert ``model`` several ways and check every invariant of a correct conversion.

    - the converted model has the model's class and the original is untouched;
    - eval-mode function preserved (``init="preserve"``) with randomised norm statistics;
    - the plan's parameter delta equals the measured one; converting again changes nothing;
    - with ``init="fresh", p=0`` every non-stem weight layer sees per-feature mean ~0 and
      variance ~1 in train mode, and with ``p=0.5`` about half of its input is exactly zero
      (measured on what the weights are applied to, not on names);
    - backward reaches every trainable parameter (but those the original's backward misses too).
    """
    from .convert import convert
    from .plan import plan
    from .verify import output_tensors, verify

    result = ConversionCheck(type(model).__name__)
    fail = result.failures.append
    randomize_norms(model, seed)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    the_plan = plan(model, **options)
    converted = convert(model, **options)
    if type(converted) is not type(model):
        fail(f"class changed: {type(converted).__name__}")
    after = model.state_dict()
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
        fail("the original model was modified")
    report = verify(model, converted, x)
    result.rel_error = report.max_rel_error
    if not report.ok:
        fail(f"eval output changed: relative error {report.max_rel_error:.3g}")
    if report.param_delta != the_plan.param_delta:
        fail(f"plan predicted {the_plan.param_delta:+} parameters, measured {report.param_delta:+}")
    record = converted.__dict__.pop("icrewrite_options")  # plan the structure again, not the record
    again = plan(converted, **options)
    converted.icrewrite_options = record
    if again.edits:
        fail(f"converting twice would make {len(again.edits)} more edits, e.g. {again.edits[0]}")

    sites = {e.target for e in the_plan.edits if e.action == "insert-ic"}
    result.sites = len(sites)
    skipped = {n.target: n.reason for n in the_plan.notes}
    for name, module in model.named_modules():
        if is_weight_layer(module) and name not in sites and not skipped.get(name, "").startswith(("stem", "excluded", "classifier")):
            fail(f"{name}: no IC block ({skipped.get(name, 'not planned')})")

    torch.manual_seed(seed)
    fresh = convert(model, **{**options, "init": "fresh", "p": 0.0}).train()
    for norm in fresh.modules():
        if isinstance(norm, ICBatchNorm):
            norm.eps = 1e-30  # so that features of tiny batch variance (pooled, small batches) still normalise to 1
    inputs = weight_layer_inputs(fresh, x)
    for name in sorted(sites):
        if name not in inputs:
            fail(f"{name}: weight never applied in forward")
        elif not _normalised(inputs[name]):
            fail(f"{name}: input not normalised (no BatchNorm directly before)")
    dropped = convert(model, **{**options, "init": "fresh", "p": 0.5}).train()
    for name, t in weight_layer_inputs(dropped, x).items():
        if name in sites and t.numel() >= 400 and not 0.4 <= _zero_fraction(t) <= 0.6:
            fail(f"{name}: {_zero_fraction(t):.2f} of the input is zero with p=0.5 (no Dropout before)")

    def grads(m: nn.Module) -> set[str]:
        m.train().zero_grad(set_to_none=True)
        sum(t.float().sum() for t in output_tensors(m(x))).backward()
        return {n for n, p in m.named_parameters() if p.grad is not None}

    untrained = {n for n, p in model.named_parameters() if p.requires_grad} - grads(model)
    original = {n for n, _ in model.named_parameters()}
    trainable = {n for n, p in converted.named_parameters() if p.requires_grad or n not in original}
    missing = trainable - untrained - grads(converted)
    model.eval()
    if missing:
        fail(f"backward does not reach {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    return result
