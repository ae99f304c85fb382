"""Run a model once on ``meta`` tensors and see which weight layers are really called.

Static tracing cannot see inside modules whose Python control flow depends on tensor
shapes (timm registers many such modules as FX leaves). For the weight layers that no
trace saw, one forward pass tells what an IC block on them would do: if the layer's
``forward`` runs, its IC runs right before its weight; if only its weight is used (say
by ``F.multi_head_attention_forward``), an IC on the module would never run. The same
pass reads the input features of layers registered without them: what their own
conv/linear call receives. The pass
uses ``torch.func.functional_call`` with ``meta`` stand-ins for every parameter and
buffer, so it costs no memory or compute and leaves the model untouched: what a forward
caches in plain attributes (made from the meta stand-ins) is put back as it was (``_kept``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

from .. import model_info
from ..registry import WEIGHT_FUNCTIONS
from ._kept import attributes_kept
from ._verify import eval_mode

__all__ = ["Usage", "LayerWatch", "probe_weight_use"]


@dataclass
class Usage:
    """What one meta forward pass saw of some weight layers."""

    called: set[str] = field(default_factory=set)  # their forward ran
    weight_used_outside: set[str] = field(default_factory=set)  # weight read by an op outside their forward
    # (num_features, feature_dim) of the input of their first conv/linear call, where that is their own input's
    input_features: dict[str, tuple[int, int]] = field(default_factory=dict)


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

    def weight_op_layer(self, func: Callable, args: tuple, kwargs: dict[str, Any]) -> str | None:
        """The watched layer a conv/linear call belongs to: the one whose weight it is given, else
        the one whose ``forward`` is running (innermost), which applies a weight it derived
        (timm's ``StdConv2d`` standardises its own); None for other calls."""
        if func not in WEIGHT_FUNCTIONS or not args:
            return None
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return self.owner(weight) or (self.running[-1] if self.running else None)

    def on_call(self, func: Callable, args: tuple, kwargs: dict[str, Any]) -> None:
        """Called before every torch function runs in the block."""

    def on_enter(self, name: str, args: tuple) -> None:
        """Called when the forward of layer ``name`` starts, with its positional arguments."""

    def __enter__(self) -> LayerWatch:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self._enter(n, a)))
            self._handles.append(module.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        super().__exit__(*exc)

    def _enter(self, name: str, args: tuple) -> None:
        self.running.append(name)
        self.called.add(name)
        self.on_enter(name, args)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.running.pop()  # a forward hook that returned a value would replace the output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.on_call(func, args, kwargs)
        return func(*args, **kwargs)


def _weight_op_features(func: Callable, op_input: Any, layer_input: Any) -> tuple[int, int] | None:
    """``(num_features, feature_dim)`` that the conv/linear call ``func`` reads from ``op_input``
    (dim 1 of a convolution's batched input, the last dim of a linear map's), when the layer's
    own input ``layer_input`` has them at the same place (padding keeps them, a flatten does not)."""
    if not (isinstance(op_input, torch.Tensor) and isinstance(layer_input, torch.Tensor)):
        return None
    linear = func is F.linear
    dim = -1 if linear else 1
    if op_input.dim() < 2 or (not linear and layer_input.dim() != op_input.dim()) or layer_input.dim() < 2:
        return None
    features = op_input.shape[dim]
    return (features, dim) if layer_input.shape[dim] == features else None


class _Probe(LayerWatch):
    """Records the layers whose weight a torch op reads while their own forward is not running,
    and the features each layer's first conv/linear call reads from the layer's input."""

    def __init__(self, layers: Mapping[str, nn.Module], weights: Mapping[int, str]) -> None:
        super().__init__(layers, weights)
        self.outside: set[str] = set()
        self.inputs: dict[str, Any] = {}  # the first positional argument of each layer's first call
        self.weight_ops: set[str] = set()  # the layers whose first conv/linear call was seen
        self.features: dict[str, tuple[int, int]] = {}

    def on_enter(self, name: str, args: tuple) -> None:
        self.inputs.setdefault(name, args[0] if args else None)

    def on_call(self, func: Callable, args: tuple, kwargs: dict[str, Any]) -> None:
        if getattr(func, "__name__", "") == "__get__":  # reading .shape or .dtype is not a use
            return
        for leaf in tree_leaves((args, kwargs)):
            name = self.owner(leaf)
            if name is not None and name not in self.running:
                self.outside.add(name)
        name = self.weight_op_layer(func, args, kwargs)
        if name is not None and name not in self.weight_ops:
            self.weight_ops.add(name)
            features = _weight_op_features(func, args[0], self.inputs.get(name))
            if features is not None:
                self.features[name] = features


def probe_weight_use(model: nn.Module, layers: Iterable[str], input_size: tuple[int, ...] | None = None
                     ) -> Usage | None:
    """Which of ``layers`` (module names) one forward pass calls, whose weights it uses elsewhere,
    and the input features their own conv/linear calls read (``Usage.input_features``).

    Returns None when the model does not run on a meta input of ``input_size`` (default: the
    model's, see :func:`icrewrite.model_info.input_size`), e.g. because it reads tensor values.
    """
    modules = {name: model.get_submodule(name) for name in layers}
    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in [*model.named_parameters(), *model.named_buffers()]}
    weights = {id(stand_ins[f"{name}.weight"]): name for name in modules if f"{name}.weight" in stand_ins}
    x = torch.empty(2, *(model_info.input_size(model, input_size) or model_info.DEFAULT_INPUT_SIZE), device="meta")
    try:
        with eval_mode(model), torch.no_grad(), attributes_kept(model), _Probe(modules, weights) as watch:
            torch.func.functional_call(model, stand_ins, (x,), strict=False)
    except Exception:  # data-dependent code cannot run on meta tensors: nothing learned
        return None
    return Usage(watch.called, watch.outside, watch.features)
