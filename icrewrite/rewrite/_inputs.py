"""Checks of what a Python caller hands to ``convert``, ``verify`` and ``save``, before any work.

Options and plans are parsed by ``Options``/``Plan`` (``_plan``); these are the other
arguments: the model itself and calibration data.
Each failure is one ``ConversionError`` line naming the argument.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError

__all__ = ["check_model_usable", "check_convert_arguments"]


def check_model_usable(model: Any, what: str, *, real_tensors: bool = True) -> None:
    """Raise unless ``model`` is an ``nn.Module`` that ``what`` (a function name, for the
    message) can run or read: not TorchScript, and with ``real_tensors`` not on the meta
    device (``convert`` works on meta models: it reads structure, not values)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ConversionError(f"{what} takes a Python nn.Module, got a TorchScript module ({type(model).__name__}); "
                              "pass the model before torch.jit.script/trace")
    if not isinstance(model, nn.Module):
        raise ConversionError(f"{what} takes an nn.Module, got {type(model).__name__}")
    if not real_tensors:
        return
    meta = next((name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if meta is not None:
        raise ConversionError(f"{what} needs real tensors, but {meta} is on the meta device (no values): "
                              "materialise the model first (to_empty + load weights)")


def _checked_batches(data: Iterable) -> Iterator[Any]:
    """The batches of ``data``, each checked as it is read; none at all is an error (statistics
    from nothing would silently be the data-free ones)."""
    count = 0
    for count, batch in enumerate(data, 1):
        first = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(first, torch.Tensor):
            raise ConversionError(f"calibration batch {count - 1} is {type(first).__name__}, not a tensor (or a "
                                  "tuple whose first item is the input tensor)")
        yield batch
    if count == 0:
        raise ConversionError("the calibration data yielded no batches (an empty data set, or no image in it "
                              "could be read)")


def check_convert_arguments(model: Any, *, calibration: Any, calibration_batches: Any) -> Iterable | torch.Tensor | None:
    """Raise a one-line ``ConversionError`` for arguments of ``convert`` of the wrong kind
    (``Options`` checks the conversion options); returns ``calibration`` with each batch
    checked as it is read."""
    check_model_usable(model, "convert", real_tensors=False)
    if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
        raise ConversionError(f"calibration_batches must be a positive integer, got {calibration_batches!r}")
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise ConversionError(f"calibration must be a tensor or an iterable of batches (a DataLoader), got "
                              f"{type(calibration).__name__}")
    return _checked_batches(calibration)
