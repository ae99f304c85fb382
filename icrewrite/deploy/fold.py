"""Fold IC blocks into the weight layers they feed, for deployment.

In eval mode an IC block is the per-feature affine map ``a * x + b`` (Dropout is the
identity), so the weight layer after it can absorb it: ``W(a x + b) = (W a) x + W b``.
That is exact for ``Linear`` and for convolutions that never see padded zeros. A
zero-padded convolution pads ``a x + b`` with zeros, not ``b``, so there
``conv_W(pad0(a x + b)) = conv_{W a}(pad0(x)) + conv_W(pad0(b 1))``: the second term is a
constant map, uniform inside and different only at the border. At a fixed input size it
is precomputed and added as a buffer (``BorderCorrectedConv*``). Every other IC stays in
the model as one affine op (BatchNormalization in ONNX) and the report says why.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import Linear as TimmLinear
from torch import nn

from ..errors import ExportError
from ..layers import (BorderCorrectedConv1d, BorderCorrectedConv2d, BorderCorrectedConv3d, ICWeightLayer, ic_base,
                      swap_class)

__all__ = [
    "fold_ic",
    "FoldReport",
    "BorderCorrectedConv1d",
    "BorderCorrectedConv2d",
    "BorderCorrectedConv3d",
]

_PLAIN_CONVS: tuple[type[nn.modules.conv._ConvNd], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Linear classes whose forward is F.linear(x, weight, bias) (timm's only adds a cast when scripted).
_PLAIN_LINEARS: tuple[type[nn.Linear], ...] = (nn.Linear, TimmLinear)


_BORDER_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: BorderCorrectedConv1d,
    nn.Conv2d: BorderCorrectedConv2d,
    nn.Conv3d: BorderCorrectedConv3d,
}


@dataclass
class FoldReport:
    """What :func:`fold_ic` did to each converted weight layer.

    ``folded``: the IC is in the layer's weight and bias, exact at any input size.
    ``border_corrected``: folded plus a constant border map, exact at ``input_size`` only.
    ``kept``: layer name -> why its IC stays as a separate affine op.
    """

    input_size: tuple[int, ...] | None = None
    folded: list[str] = field(default_factory=list)
    border_corrected: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.folded) + len(self.border_corrected) + len(self.kept)

    def summary(self) -> str:
        """One line, e.g. ``"53 ICs: 37 folded, 16 folded with a border correction (exact at 3x224x224), 0 kept"``."""
        parts = [f"{len(self.folded)} folded"]
        if self.border_corrected:
            size = "x".join(map(str, self.input_size or ()))
            parts.append(f"{len(self.border_corrected)} folded with a border correction (exact at {size})")
        parts.append(f"{len(self.kept)} kept as an affine op")
        return f"{self.total} ICs: {', '.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (used for the ONNX metadata)."""
        return {
            "input_size": list(self.input_size) if self.input_size else None,
            "folded": list(self.folded),
            "border_corrected": list(self.border_corrected),
            "kept": dict(self.kept),
        }

    def __str__(self) -> str:
        reasons = Counter(self.kept.values())
        lines = [self.summary()]
        lines += [f"  kept ({count}): {reason}" for reason, count in reasons.most_common()]
        return "\n".join(lines)


def fold_ic(
    model: nn.Module, *, input_size: Sequence[int] | None = None, inplace: bool = False
) -> tuple[nn.Module, FoldReport]:
    """Fold the eval-mode affine of every IC into the weight layer it feeds, where exact.

    Args:
        model: a model with converted weight layers (``ICWeightLayer``); others pass through.
        input_size: ``(C, H, W)`` of one input sample. Needed to fold ICs before
            zero-padded convolutions (border correction); without it those ICs are kept.
        inplace: change ``model`` itself instead of a deep copy.

    Returns the folded model in eval mode (same class; folded layers become their base
    class, or ``BorderCorrectedConv*``) and a :class:`FoldReport`. The result computes the
    eval-mode function of ``model``; with border corrections, only at ``input_size``.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ICWeightLayer)}
    report = FoldReport(input_size=tuple(input_size) if input_size else None)
    padded = {name: m for name, m in layers.items() if _plain_conv(type(m)) and _zero_padded(m)}
    input_shapes = _input_shapes(model, padded, report.input_size) if padded and report.input_size else {}
    shared = _shared_weights(model)
    for name, layer in layers.items():
        reason = _why_not_foldable(layer, shared, input_shapes.get(name), report.input_size)
        if reason:
            report.kept[name] = reason
        elif isinstance(layer, nn.Linear):
            _fold_linear(layer)
            report.folded.append(name)
        elif not _zero_padded(layer):
            _fold_conv(layer)
            report.folded.append(name)
        else:
            (shape,) = input_shapes[name]
            _fold_padded_conv(layer, shape)
            report.border_corrected.append(name)
    return model, report


def _plain_conv(cls: type[nn.Module]) -> type[nn.Module] | None:
    """The torch convolution class whose forward ``cls`` runs unchanged, else None."""
    base = ic_base(cls) if issubclass(cls, ICWeightLayer) else cls
    for conv in _PLAIN_CONVS:
        if issubclass(base, conv) and base.forward is conv.forward and base._conv_forward is conv._conv_forward:
            return conv
    return None


def _zero_padded(conv: nn.modules.conv._ConvNd) -> bool:
    """True when the convolution pads its input with zeros (other modes pad ``a x + b`` exactly)."""
    return conv.padding_mode == "zeros" and any(conv._reversed_padding_repeated_twice)


def _why_not_foldable(
    layer: nn.Module,
    shared: set[int],
    shapes: set[torch.Size] | None,
    input_size: tuple[int, ...] | None,
) -> str | None:
    """Why the IC of ``layer`` cannot be folded exactly, or None when it can."""
    base = ic_base(type(layer))
    is_linear = any(issubclass(base, cls) and base.forward is cls.forward for cls in _PLAIN_LINEARS)
    if not is_linear and not _plain_conv(base):
        return f"{base.__name__} is not a plain Linear or Conv1d/2d/3d (own forward)"
    if id(layer.weight) in shared:
        return "weight shared with another layer"
    if is_linear or not _zero_padded(layer):
        return None
    if input_size is None:
        return "zero-padded convolution: an exact fold needs a border correction at a fixed input size"
    if not shapes:
        return f"not called at input size {input_size}"
    if len(shapes) > 1:
        return "called at several input sizes"
    return None


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (folding one would change the other)."""
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return {pid for pid, n in owners.items() if n > 1}


@torch.no_grad()
def _input_shapes(
    model: nn.Module, layers: dict[str, nn.Module], input_size: tuple[int, ...]
) -> dict[str, set[torch.Size]]:
    """Per-sample input shapes that each of ``layers`` sees when ``model`` runs at ``input_size``."""
    shapes: dict[str, set[torch.Size]] = {name: set() for name in layers}

    def recorder(name: str):
        return lambda module, args: shapes[name].add(args[0].shape[1:])

    handles = [layer.register_forward_pre_hook(recorder(name)) for name, layer in layers.items()]
    param = next(model.parameters(), None)
    example = torch.zeros(1, *input_size, device=param.device if param is not None else None)
    try:
        model(example)
    except Exception as error:
        raise ExportError(f"model does not run on an input of size {input_size}: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _detach_ic(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the IC from ``layer`` (back to its base class); return its eval ``(scale, shift)`` in float64."""
    scale, shift = layer.ic.affine()
    del layer.ic
    swap_class(layer, ic_base(type(layer)))
    return scale.double(), shift.double()


def _set_weight_and_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy float64 results into ``layer`` (creating a bias when it had none)."""
    layer.weight.copy_(weight.to(layer.weight.dtype))
    bias = bias.to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias)


def _bias_or_zero(layer: nn.Module, out_features: int) -> torch.Tensor:
    if layer.bias is None:
        return layer.weight.new_zeros(out_features, dtype=torch.float64)
    return layer.bias.double()


@torch.no_grad()
def _fold_linear(layer: nn.Linear) -> None:
    """``W (a x + b) + c = (W a) x + (W b + c)``."""
    scale, shift = _detach_ic(layer)
    weight = layer.weight.double()
    _set_weight_and_bias(layer, weight * scale, _bias_or_zero(layer, layer.out_features) + weight @ shift)


def _per_weight(conv: nn.modules.conv._ConvNd, per_in_channel: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-channel vector to the weight's ``(C_out, C_in / groups, 1, ...)`` layout."""
    groups = conv.groups
    in_per_group = conv.in_channels // groups
    out_per_group = conv.out_channels // groups
    per_out = per_in_channel.view(groups, in_per_group).repeat_interleave(out_per_group, dim=0)
    return per_out.view(conv.out_channels, in_per_group, *([1] * (conv.weight.dim() - 2)))


@torch.no_grad()
def _fold_conv(conv: nn.modules.conv._ConvNd) -> torch.Tensor:
    """Fold the IC into weight and bias, ``conv_W(a x + b) = conv_{W a}(x) + sum(W b)``.

    Returns the original float64 weight times the per-channel shift (``W b``), which the
    border correction of a zero-padded convolution needs.
    """
    scale, shift = _detach_ic(conv)
    weight = conv.weight.double()
    weight_shift = weight * _per_weight(conv, shift)
    bias = _bias_or_zero(conv, conv.out_channels) + weight_shift.flatten(1).sum(1)
    _set_weight_and_bias(conv, weight * _per_weight(conv, scale), bias)
    return weight_shift


@torch.no_grad()
def _fold_padded_conv(conv: nn.modules.conv._ConvNd, input_shape: torch.Size) -> None:
    """Fold into weight and bias as if unpadded, then add the border difference as a buffer.

    ``conv_W(pad0(b 1))`` at ``input_shape`` minus its interior value ``sum(W b)`` is zero
    inside and corrects the positions whose receptive field reaches the padding.
    """
    weight_shift = _fold_conv(conv)
    ones = torch.ones(1, conv.in_channels, *input_shape[1:], dtype=torch.float64, device=conv.weight.device)
    shift_map = conv._conv_forward(ones, weight_shift, None)[0]
    interior = weight_shift.flatten(1).sum(1).view(-1, *([1] * (shift_map.dim() - 1)))
    swap_class(conv, _BORDER_CLASSES[_plain_conv(type(conv))])
    conv.register_buffer("border", (shift_map - interior).to(conv.weight.dtype))
