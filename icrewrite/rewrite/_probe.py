"""Run a model once on ``meta`` tensors and see which weight layers are really called.

Static tracing cannot see inside modules whose Python control flow depends on tensor
shapes (timm registers many such modules as FX leaves). For the weight layers that no
trace saw, one forward pass tells what an IC block on them would do: if the layer's
``forward`` runs, its IC runs right before its weight; if only its weight is used (say
by ``F.multi_head_attention_forward``), an IC on the module would never run. The pass
uses ``torch.func.functional_call`` with ``meta`` stand-ins for every parameter and
buffer, so it costs no memory or compute and leaves the model untouched: what a forward
caches in plain attributes (made from the meta stand-ins) is put back as it was (``_kept``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from .. import model_info
from ._kept import attributes_kept
from ._verify import eval_mode

__all__ = ["Usage", "LayerWatch", "probe_weight_use"]


@dataclass
class Usage:
    """What one meta forward pass saw of some weight layers."""

    called: set[str] = field(default_factory=set)  # their forward ran
    weight_used_outside: set[str] = field(default_factory=set)  # weight read by an op outside their forward


class LayerWatch(TorchFunctionMode):
    """Within the block, which of ``layers`` (name -> module) have their ``forward`` running
    (``running``, innermost last; ``called``: every one that ran), and each torch call that
    reads one of ``weights`` (``id(tensor)`` -> layer name): :meth:`on_call` sees it.

    What the probe and the placement check (``icrewrite.testing``) both need: a weight op
    belongs to the layer whose weight it is given, or to the layer whose forward is running.
    """

    def __init__(self, layers: Mapping[str, nn.Module], weights: Mapping[int, str]) -> None:
        super().__init__()
        self.layers, self.weights = layers, weights
        self.running: list[str] = []
        self.called: set[str] = set()
        self._handles: list[RemovableHandle] = []

    def owner(self, tensor: Any) -> str | None:
        """The watched layer whose weight ``tensor`` is, or None."""
        return self.weights.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def on_call(self, func: Callable, args: tuple, kwargs: dict[str, Any]) -> None:
        """Called before every torch function runs in the block."""

    def __enter__(self) -> LayerWatch:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n)))
            self._handles.append(module.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def _enter(self, name: str) -> None:
        self.running.append(name)
        self.called.add(name)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.running.pop()  # a forward hook that returned a value would replace the output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.on_call(func, args, kwargs)
        return func(*args, **kwargs)


class _OutsideUse(LayerWatch):
    """Records the layers whose weight a torch op reads while their own forward is not running."""

    def __init__(self, layers: Mapping[str, nn.Module], weights: Mapping[int, str]) -> None:
        super().__init__(layers, weights)
        self.outside: set[str] = set()

    def on_call(self, func: Callable, args: tuple, kwargs: dict[str, Any]) -> None:
        if getattr(func, "__name__", "") == "__get__":  # reading .shape or .dtype is not a use
            return
        for leaf in tree_leaves((args, kwargs)):
            name = self.owner(leaf)
            if name is not None and name not in self.running:
                self.outside.add(name)


def probe_weight_use(model: nn.Module, layers: Iterable[str], input_size: tuple[int, ...] | None = None
                     ) -> Usage | None:
    """Which of ``layers`` (module names) one forward pass calls, and whose weights it uses elsewhere.

    Returns None when the model does not run on a meta input of ``input_size`` (default: the
    model's, see :func:`icrewrite.model_info.input_size`), e.g. because it reads tensor values.
    """
    modules = {name: model.get_submodule(name) for name in layers}
    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    weights = {id(stand_ins[f"{name}.weight"]): name for name in modules if f"{name}.weight" in stand_ins}
    x = torch.empty(2, *(model_info.input_size(model, input_size) or model_info.DEFAULT_INPUT_SIZE), device="meta")
    try:
        with eval_mode(model), torch.no_grad(), attributes_kept(model), _OutsideUse(modules, weights) as watch:
            torch.func.functional_call(model, stand_ins, (x,), strict=False)
    except Exception:  # data-dependent code cannot run on meta tensors: nothing learned
        return None
    return Usage(watch.called, watch.outside)
