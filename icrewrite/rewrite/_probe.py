"""Run a model once on ``meta`` tensors and see which weight layers are really called.

Static tracing cannot see inside modules whose Python control flow depends on tensor
shapes (timm registers many such modules as FX leaves). For the weight layers that no
trace saw, one forward pass tells what an IC block on them would do: if the layer's
``forward`` runs, its IC runs right before its weight; if only its weight is used (say
by ``F.multi_head_attention_forward``), an IC on the module would never run. The pass
uses ``torch.func.functional_call`` with ``meta`` stand-ins for every parameter and
buffer, so it costs no memory or compute and leaves the model untouched.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .. import model_info

__all__ = ["Usage", "probe_weight_use"]

@dataclass
class Usage:
    """What one meta forward pass saw of some weight layers."""

    called: set[str] = field(default_factory=set)  # their forward ran
    weight_used_outside: set[str] = field(default_factory=set)  # weight read by an op outside their forward


class _WeightUseRecorder(TorchFunctionMode):
    """Record torch ops that read a watched weight while its layer's forward is not running."""

    def __init__(self, owners: dict[int, str], active: set[str], usage: Usage) -> None:
        super().__init__()
        self.owners, self.active, self.usage = owners, active, usage

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") != "__get__":  # reading .shape or .dtype is not a use
            for leaf in tree_leaves((args, kwargs)):
                name = self.owners.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
                if name is not None and name not in self.active:
                    self.usage.weight_used_outside.add(name)
        return func(*args, **kwargs)


def probe_weight_use(model: nn.Module, layers: Iterable[str], input_size: tuple[int, ...] | None = None
                     ) -> Usage | None:
    """Which of ``layers`` (module names) one forward pass calls, and whose weights it uses elsewhere.

    Returns None when the model does not run on a meta input of ``input_size`` (default: the
    model's, see :func:`icrewrite.model_info.input_size`), e.g. because it reads tensor values.
    """
    layers = set(layers)
    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    owners = {id(stand_ins[f"{name}.weight"]): name for name in layers if f"{name}.weight" in stand_ins}
    usage, active = Usage(), set()
    handles = []
    for name in layers:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: active.add(n) or usage.called.add(n)))
        handles.append(module.register_forward_hook(lambda m, a, o, n=name: active.discard(n)))
    x = torch.empty(2, *(model_info.input_size(model, input_size) or model_info.DEFAULT_INPUT_SIZE), device="meta")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _WeightUseRecorder(owners, active, usage):
            torch.func.functional_call(model, stand_ins, (x,), strict=False)
    except Exception:  # data-dependent code cannot run on meta tensors: nothing learned
        return None
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return usage
