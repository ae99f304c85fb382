"""``verify``: measure what a conversion did, without trusting the plan.

Parameter parity comes from diffing the two models' named parameters (so it checks the
plan's predicted delta); function parity from running both in eval mode on one input.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, few
from ._inputs import check_model_usable

__all__ = ["Report", "verify", "output_tensors", "eval_mode"]

TOLERANCE = 1e-4  # max abs error allowed, relative to max |output|


@dataclass
class Report:
    params_before: int
    params_after: int
    changes: dict[str, int] = field(default_factory=dict)  # module -> parameter delta
    max_abs_error: float | None = None
    max_rel_error: float | None = None  # max abs error / max |original output|
    non_finite: str | None = None  # where NaN or infinite values were found (parameters, buffers, outputs)

    @property
    def param_delta(self) -> int:
        return self.params_after - self.params_before

    @property
    def param_delta_pct(self) -> float:
        return 100.0 * self.param_delta / max(self.params_before, 1)

    @property
    def ok(self) -> bool:
        """True when the function is preserved within tolerance (or was not checked)."""
        return self.non_finite is None and (self.max_rel_error is None or self.max_rel_error <= TOLERANCE)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "param_delta": self.param_delta, "param_delta_pct": self.param_delta_pct,
                "ok": self.ok}

    def __str__(self) -> str:
        added = sum(d for d in self.changes.values() if d > 0)
        removed = -sum(d for d in self.changes.values() if d < 0)
        lines = [
            f"parameters: {self.params_before:,} -> {self.params_after:,} "
            f"({self.param_delta:+,}, {self.param_delta_pct:+.3f}%): +{added:,} in "
            f"{sum(d > 0 for d in self.changes.values())} modules, -{removed:,} in "
            f"{sum(d < 0 for d in self.changes.values())} modules",
        ]
        if self.max_abs_error is not None:
            verdict = "function preserved" if self.ok else "FUNCTION CHANGED"
            if self.non_finite:
                verdict += f" ({self.non_finite})"
            lines.append(f"eval output: max abs error {self.max_abs_error:.3g}, relative {self.max_rel_error:.3g} "
                         f"(tolerance {TOLERANCE:g}): {verdict}")
        return "\n".join(lines)


def _param_counts(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters()}


def _changes(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Parameter delta per owning module, from parameter names present in one model only."""
    delta: dict[str, int] = defaultdict(int)
    for name in before.keys() | after.keys():
        diff = after.get(name, 0) - before.get(name, 0)
        if diff:
            delta[name.rsplit(".", 1)[0] if "." in name else ""] += diff
    return dict(sorted(delta.items()))


def output_tensors(output: Any) -> list[torch.Tensor]:
    """The tensors in a model output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    return []


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` for a block that may switch any of its modules between train and eval mode;
    afterwards each module is back in the mode it was in."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then each module back in the mode it was in (a
    training model with frozen, eval-mode BatchNorms keeps them frozen)."""
    with modes_kept(model):
        yield model.eval()


@torch.no_grad()
def _eval_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with eval_mode(model):
        return output_tensors(model(x))


def _not_finite(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    return [name for name, t in named if t.is_floating_point() and not t.is_meta and not torch.isfinite(t).all()]


def _non_finite(original: nn.Module, converted: nn.Module, outputs: dict[str, list[torch.Tensor]]) -> str | None:
    """Where NaN or infinite values are, named: parameters and buffers first (the cause), else outputs."""
    found = []
    for which, model in (("original", original), ("converted", converted)):
        names = _not_finite([*model.named_parameters(), *model.named_buffers()])
        if names:
            found.append(f"NaN or infinite values in the {which} model's {few(names)}")
    if not found:
        found = [f"NaN or infinite values in the {which} model's output"
                 for which, tensors in outputs.items() if _not_finite([("", t) for t in tensors])]
    return "; ".join(found) or None


def verify(original: nn.Module, converted: nn.Module, example_input: torch.Tensor | None = None) -> Report:
    """Parameter parity and, given ``example_input``, eval-mode output error of ``converted``."""
    for model in (original, converted):  # parameter parity reads shapes only; outputs need real tensors
        check_model_usable(model, "verify", real_tensors=example_input is not None)
    before, after = _param_counts(original), _param_counts(converted)
    report = Report(sum(before.values()), sum(after.values()), _changes(before, after))
    if example_input is not None:
        ref, out = _eval_outputs(original, example_input), _eval_outputs(converted, example_input)
        report.non_finite = _non_finite(original, converted, {"original": ref, "converted": out})
        if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
            raise ConversionError("the two models return outputs of different structure or shape")
        abs_err = max(((a.float() - b.float()).abs().max().item() for a, b in zip(ref, out)), default=0.0)
        scale = max((a.float().abs().max().item() for a in ref), default=0.0)
        report.max_abs_error = abs_err
        report.max_rel_error = abs_err / scale if scale > 0 else abs_err
    return report
