"""Helpers to test conversions honestly (used by the test suite and the zoo sweep)."""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .layers import IC, ICWeightLayer, feature_columns
from .registry import WEIGHT_FUNCTIONS, is_batchnorm, is_weight_layer
from .rewrite import TOLERANCE, LayerWatch, clone_module, convert, output_tensors, plan, verify


OPTED_OUT = ("stem", "excluded", "head")  # note kinds of weight layers the options leave without IC blocks


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
        if isinstance(module, _NormBase) or is_batchnorm(module):
            for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.3, 3.0), ("weight", 0.3, 2.0), ("bias", -0.5, 0.5)):
                t = getattr(module, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                    t.copy_(rand(t, low, high))
    return model


# Dropout probability of the placement check: dropped positions are then unmistakable
# (exact zeros, about half of them) and the kept ones carry the 1/(1-p) scale.
PLACEMENT_P = 0.5


@torch.no_grad()
def _ic_deviation(ic: IC, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """How far the kept outputs ``y = ic(x)`` are from train-mode ``BatchNorm(x) / (1 - p)``, and how many were dropped.

    The deviation is in tolerances (<= 1 matches). The reference is computed in float64 from
    ``x``; each feature's tolerance is 1e-3 of its output scale plus the float rounding of its
    batch mean, which dominates for features nearly constant over the batch (pooled ones, dead
    ReLUs). A random affine on the IC BatchNorm makes such features evidence too: they must
    equal their own ``beta / (1 - p)``, not 0. Dropped outputs are exact zeros.
    """
    norm = ic.norm
    xs, ys = feature_columns(x, ic.feature_dim).double(), feature_columns(y, ic.feature_dim).double()
    mean, std = xs.mean(0), (xs.var(0, unbiased=False) + norm.eps).sqrt()
    keep = 1.0 - ic.p
    scale = norm.weight.double() / std / keep
    expected = (xs - mean) * scale + norm.bias.double() / keep
    rounding = 16 * math.sqrt(xs.shape[0]) * torch.finfo(x.dtype).eps * xs.abs().amax(0)
    kept = ys != 0
    deviation = ((ys - expected).abs() / (scale.abs() * (1e-3 * std + rounding)))[kept]
    return (deviation.max().item() if deviation.numel() else 0.0), int((~kept).sum())


def _reads(weight_input: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether a weight op's input is ``output`` itself: the same tensor, or the same values
    zero-padded on the borders (timm's ``Conv2dSame`` pads in its forward), and either one
    reshaped (timm's ``CondConv2d`` folds the batch into the channels, ``(1, B * C, H, W)``)."""
    if weight_input is output:
        return True
    if weight_input.numel() == output.numel():
        return torch.equal(weight_input.reshape(-1), output.reshape(-1))
    if weight_input.dim() != output.dim() or weight_input.dim() < 3:
        return False
    if weight_input.shape[:2] != output.shape[:2]:
        if weight_input.shape[0] * weight_input.shape[1] != output.shape[0] * output.shape[1]:
            return False
        weight_input = weight_input.reshape(*output.shape[:2], *weight_input.shape[2:])
    spatial = output.shape[2:]
    margins = [a - b for a, b in zip(weight_input.shape[2:], spatial)]
    if min(margins, default=0) < 0:
        return False
    return any(torch.equal(weight_input[(..., *(slice(s, s + n) for s, n in zip(start, spatial)))], output)
               for start in itertools.product(*(range(m + 1) for m in margins)))


@dataclass
class _ObservedSite:
    """What one IC site did during the checking forward pass."""

    ic_calls: int = 0
    weight_calls: int = 0
    deviation: float = 0.0  # largest, over calls, of :func:`_ic_deviation`
    dropped: int = 0
    elements: int = 0
    misread: str | None = None  # what the weight was applied to instead of the IC output
    output: torch.Tensor | None = None  # the IC output of the latest call

    def observe(self, ic: IC, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        """Forward hook of the site's IC block."""
        deviation, dropped = _ic_deviation(ic, args[0], output)
        self.ic_calls += 1
        self.deviation = max(self.deviation, deviation)
        self.dropped += dropped
        self.elements += output.numel()
        self.output = output

    def failures(self, name: str, p: float) -> list[str]:
        """What is wrong at this site: the IC block missing in action, the weight applied to
        something else, no BatchNorm or no Dropout in the IC output."""
        if not self.ic_calls:
            return [f"{name}: its IC block never ran"]
        if not self.weight_calls:
            return [f"{name}: weight never applied in forward"]
        found = [f"{name}: weight applied to {self.misread}"] if self.misread else []
        if self.deviation > 1.0:
            found.append(f"{name}: IC output is not BatchNorm of its input (off by {self.deviation:.3g} tolerances)")
        spread = 6.0 * math.sqrt(p * (1.0 - p) / self.elements) + 1.0 / self.elements
        if abs(self.dropped / self.elements - p) > spread:
            found.append(f"{name}: {self.dropped / self.elements:.2f} of the IC output is zero with p={p} "
                         f"(expected {p} +- {spread:.2f}: no Dropout)")
        return found


class _WeightOpRecorder(LayerWatch):
    """Match every conv/linear call to its weight layer and note whether it reads that site's IC output.

    A call belongs to the layer whose weight tensor it is given or, for layers that transform
    their weight before using it (timm's ``StdConv2d``, ``ScaledStdConv2d``), to the weight
    layer whose ``forward`` is running (innermost).
    """

    def __init__(self, layers: dict[str, nn.Module], sites: dict[str, _ObservedSite]) -> None:
        weights = {id(m.weight): name for name, m in layers.items()
                   if isinstance(getattr(m, "weight", None), torch.Tensor)}
        super().__init__(layers, weights)
        self.sites = sites

    def on_call(self, func: Callable, args: tuple, kwargs: dict[str, Any]) -> None:
        if func not in WEIGHT_FUNCTIONS or not args:
            return
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        site = self.sites.get(self.owner(weight) or (self.running[-1] if self.running else None))
        if site is not None:
            site.weight_calls += 1
            if site.misread is None and site.output is None:
                site.misread = "its input before its IC block ran"
            elif site.misread is None and not _reads(args[0], site.output):
                site.misread = f"a {tuple(args[0].shape)} tensor that is not its IC block's output"


@contextlib.contextmanager
def _observed(model: nn.Module, sites: Iterable[str]) -> Iterator[dict[str, _ObservedSite]]:
    """Within the block, record what the IC block of each site (a weight layer name) computes
    and what the layer's weight is applied to. Weight ops are intercepted with a
    ``TorchFunctionMode``, so this trusts no module structure beyond the ``ic`` child.

    With forward hooks on its IC block, a layer does not fuse the block into one operator with
    its weight (which would skip the hooks): what runs here is the IC module, then the layer.
    """
    layers = {name: m for name, m in model.named_modules() if is_weight_layer(m)}
    records = {name: _ObservedSite() for name in sites}
    handles = [layers[name].ic.register_forward_hook(site.observe)
               for name, site in records.items() if isinstance(layers.get(name), ICWeightLayer)]
    try:
        with _WeightOpRecorder(layers, records):
            yield records
    finally:
        for handle in handles:
            handle.remove()


def _reached(model: nn.Module, x: torch.Tensor) -> set[str]:
    """Names of the parameters that a train-mode backward from every output reaches."""

    model.train().zero_grad(set_to_none=True)
    sum(t.float().sum() for t in output_tensors(model(x))).backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def _float64_error(model: nn.Module, x: torch.Tensor, options: dict[str, Any]) -> float | None:
    """Eval-mode relative error of converting a float64 copy of ``model``; None when it does not run in float64.

    Float32 rounding, amplified by an ill-conditioned random network, can exceed the tolerance
    on its own (fbnetv3_b at 32x32: 1.1e-2 in float32, 2.5e-8 in float64; the float32 original
    is 3e-2 away from its float64 self): float64 tells that from a wrong conversion.
    """

    double = clone_module(model).double()
    x = x.double() if x.is_floating_point() else x
    try:
        with torch.no_grad():
            double(x)
    except RuntimeError:  # float32 tensors made inside forward
        return None
    return verify(double, convert(double, **options), x).max_rel_error


def _check_placement(converted: nn.Module, sites: set[str], x: torch.Tensor, seed: int) -> tuple[list[str], set[str]]:
    """Placement failures of the IC sites, and the parameters backward reached, from one
    train-mode forward and backward of ``converted`` with every IC at ``PLACEMENT_P`` and
    randomised norms (``converted`` is changed so)."""
    for ic in converted.modules():
        if isinstance(ic, IC):
            ic.drop.p = PLACEMENT_P
    randomize_norms(converted, seed + 1)
    torch.manual_seed(seed)
    with _observed(converted, sites) as observed:
        reached = _reached(converted, x)
    failures = []
    for name in sorted(sites):
        if isinstance(converted.get_submodule(name), ICWeightLayer):
            failures += observed[name].failures(name, PLACEMENT_P)
        else:
            failures.append(f"{name}: no IC block after convert")
    return failures, reached


@dataclass
class ConversionCheck:
    """Outcome of :func:`check_conversion`; ``failures`` is empty when every invariant holds."""

    model: str
    sites: int = 0
    rel_error: float | None = None
    rel_error_float64: float | None = None  # measured only when the float32 error is over the tolerance
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def check_conversion(model: nn.Module, x: torch.Tensor, *, seed: int = 0, **options) -> ConversionCheck:
    """Convert ``model`` once and check every invariant of a correct conversion.

    - the converted model has the model's class and the original is untouched;
    - eval-mode function preserved (``init="preserve"``) with randomised norm statistics; in
      float64 too when float32 rounding alone exceeds the tolerance;
    - the plan's parameter delta equals the measured one; converting again changes nothing;
    - in train mode, with every IC at p=0.5 and randomised norms: the weight of every IC site
      is applied to its IC block's output, which is ``BatchNorm(input) / (1 - p)`` element by
      element where kept and about half dropped (checked on what the conv/linear calls receive);
    - backward reaches every trainable parameter (but those the original's backward misses too).

    Randomises ``model``'s norms in place (see :func:`randomize_norms`).
    """

    result = ConversionCheck(type(model).__name__)
    fail = result.failures.append
    randomize_norms(model, seed)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    the_plan = plan(model, **options)
    converted = convert(model, plan=the_plan)
    if type(converted) is not type(model):
        fail(f"class changed: {type(converted).__name__}")
    after = model.state_dict()
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
        fail("the original model was modified")
    report = verify(model, converted, x)
    result.rel_error = report.max_rel_error
    if not report.ok:
        result.rel_error_float64 = _float64_error(model, x, options)
        if result.rel_error_float64 is None or result.rel_error_float64 > TOLERANCE:
            exact = "" if result.rel_error_float64 is None else f", {result.rel_error_float64:.3g} in float64"
            fail(f"eval output changed: relative error {report.max_rel_error:.3g}{exact}")
    if report.param_delta != the_plan.param_delta:
        fail(f"plan predicted {the_plan.param_delta:+} parameters, measured {report.param_delta:+}")
    record = converted.__dict__.pop("icrewrite_options")  # plan the structure again, not the record
    again = plan(converted, **options)
    converted.icrewrite_options = record
    if again.edits:
        fail(f"converting twice would make {len(again.edits)} more edits, e.g. {again.edits[0]}")

    sites = {e.target for e in the_plan.edits if e.action == "insert-ic"}
    result.sites = len(sites)
    skipped = {n.target: n for n in the_plan.notes}
    for name, module in model.named_modules():
        note = skipped.get(name)
        if is_weight_layer(module) and name not in sites and (note is None or note.kind not in OPTED_OUT):
            fail(f"{name}: no IC block ({note.reason if note else 'not planned'})")

    placement, reached = _check_placement(converted, sites, x, seed)
    result.failures.extend(placement)
    original = {n for n, _ in model.named_parameters()}
    missing = {n for n, p in converted.named_parameters() if p.requires_grad or n not in original} - reached
    if missing:  # excused where the original's backward misses them too
        torch.manual_seed(seed)
        missing -= {n for n, p in model.named_parameters() if p.requires_grad} - _reached(model, x)
        model.eval()
    if missing:
        fail(f"backward does not reach {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    return result
