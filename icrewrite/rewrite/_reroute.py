"""Reroutes: attention modules made to call their weight layers as modules.

Some attention modules pass a weight layer's ``weight`` to a function
(``F.linear(x, self.qkv.weight, qkv_bias)``, ``F.multi_head_attention_forward``), so an
IC block attached to that layer would never run. A reroute makes the attention compute
the same function with those layers called as modules, so they become ordinary IC sites:

- timm attention with a ``qkv_bias_separate`` flag (EVA, BEiT, Swin V2): set to True,
  it computes ``self.qkv(x) + qkv_bias`` instead of ``F.linear(x, self.qkv.weight, qkv_bias)``;
- torchvision's ``ShiftedWindowAttention(V2)``: the class becomes a subclass whose forward
  is torchvision's ``shifted_window_attention`` with ``qkv`` and ``proj`` called as modules;
- ``nn.MultiheadAttention`` called as packed, unmasked self-attention: a subclass that
  calls ``out_proj`` as a module. Its input projection is a raw parameter
  (``in_proj_weight``), not a module, so the IC block for it is the attention's own
  child ``ic``, applied to the attention input (query = key = value).

The subclasses (``icrewrite.layers.attention``) keep the module's name, parameters and
state-dict keys, and ``isinstance`` holds. A plan records a routed class by its name,
``"module:qualname"`` (``registry.class_path``), which a plan read back resolves only among the
classes ``register_reroute(..., routes_to=...)`` declared (``registry.routed_class``).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from ..errors import ConversionError
from ..layers import IC, swap_class
from ..layers.attention import RoutedMultiheadAttention, RoutedShiftedWindowAttention, RoutedShiftedWindowAttentionV2
from ..registry import class_path, register_reroute, reroute_finders, routed_class

__all__ = ["Reroute", "find_reroute", "route", "resolve_routed_class"]


@dataclass(frozen=True)
class Reroute:
    """How an attention module is made to call its functionally used weight layers as modules."""

    layers: tuple[str, ...]  # child weight layers that become module calls
    input_features: int  # features of the IC block the attention gets on its own input (0: none)
    detail: str
    routed_class: type[nn.Module] | None = None  # the class it becomes; None: timm's qkv_bias_separate is set


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _is_packed_self_attention(attention: nn.MultiheadAttention, calls: Sequence[fx.Node]) -> bool:
    """True when ``attention`` projects with ``in_proj_weight`` and every traced call of it is
    ``mha(x, x, x)`` without masks (what :class:`RoutedMultiheadAttention` computes)."""
    if not (attention._qkv_same_embed_dim and attention.bias_k is None and not attention.add_zero_attn and calls):
        return False
    for node in calls:
        try:
            args = _MHA_SIGNATURE.bind(attention, *node.args, **node.kwargs).arguments
        except TypeError:
            return False
        unmasked = all(args.get(name) in (None, False) for name in ("key_padding_mask", "attn_mask", "is_causal"))
        if not (args["query"] is args["key"] is args["value"] and unmasked):
            return False
    return True


def _separable_qkv_bias(attention: nn.Module, calls: Sequence[fx.Node]) -> Reroute | None:
    """timm attention (EVA, BEiT, Swin V2) whose ``qkv_bias_separate`` flag switches
    ``F.linear(x, qkv.weight, qkv_bias)`` to ``qkv(x) + qkv_bias``."""
    if isinstance(getattr(attention, "qkv_bias_separate", None), bool) and isinstance(
            getattr(attention, "qkv", None), nn.Linear):
        return Reroute(("qkv",), 0, "qkv_bias_separate = True: qkv called as a module, then its q/k/v bias added "
                                    "(was F.linear with qkv.weight)")
    return None


def _packed_self_attention(attention: nn.Module, calls: Sequence[fx.Node]) -> Reroute | None:
    if type(attention) is not nn.MultiheadAttention or not _is_packed_self_attention(attention, calls):
        return None
    return Reroute(("out_proj",), attention.embed_dim, "class RoutedMultiheadAttention: out_proj called as a module; "
                   "IC on the attention input, before the packed in_proj_weight", RoutedMultiheadAttention)


def _shifted_window(base: type[nn.Module], routed: type[nn.Module]
                    ) -> Callable[[nn.Module, Sequence[fx.Node]], Reroute | None]:
    """torchvision's shifted-window attention of exactly class ``base``, rerouted to ``routed``."""
    def find(attention: nn.Module, calls: Sequence[fx.Node]) -> Reroute | None:
        if type(attention) is not base:
            return None
        return Reroute(("qkv", "proj"), 0, f"class {routed.__name__}: qkv and proj called as modules "
                                           "(was shifted_window_attention with their weights)", routed)
    return find


def find_reroute(attention: nn.Module, calls: Sequence[fx.Node]) -> Reroute | None:
    """How to make ``attention`` call its weight layers as modules, or None when no registered
    reroute knows a way. ``calls``: the ``call_module`` nodes of ``attention`` in the traces.
    A reroute to a class its ``register_reroute`` call did not declare is refused: a plan that
    names it could not be read back."""
    found = next((r for find in reroute_finders(attention) if (r := find(attention, calls)) is not None), None)
    if found is not None and found.routed_class is not None and routed_class(class_path(found.routed_class)) is None:
        cls, routed = type(attention).__name__, found.routed_class.__name__
        raise ConversionError(f"a reroute of {cls} returned class {routed}, which no register_reroute call declares; "
                              f"declare it: icrewrite.register_reroute({cls}, find, routes_to=[{routed}])")
    return found


def resolve_routed_class(path: str, base: type[nn.Module]) -> type[nn.Module]:
    """The routed class a plan names for a module of class ``base``: one that ``register_reroute``
    declared in ``routes_to`` (looked up, never imported) and a subclass of ``base``."""
    found = routed_class(path)
    if found is None:
        raise ConversionError(f"unknown routed class {path!r}: no register_reroute call of this process declares it; "
                              f"register it with icrewrite.register_reroute({base.__name__}, find, routes_to=[<the "
                              "class>]) before loading the plan")
    if not issubclass(found, base):
        raise ConversionError(f"cannot reroute {base.__name__} to {found.__name__}, which is not a subclass of it")
    return found


def route(attention: nn.Module, reroute: Reroute, ic: IC | None = None) -> None:
    """Apply ``reroute`` to ``attention`` in place; ``ic`` is the IC block for its input, which
    a reroute with ``input_features`` needs (``convert`` makes it as it makes every block).
    The class it becomes must subclass the module's own class, so that ``isinstance`` holds."""
    if (ic is None) != (reroute.input_features == 0):
        raise ConversionError(f"this reroute takes an IC block of {reroute.input_features} features on the attention "
                              f"input, got {ic}")
    if reroute.routed_class is not None and not issubclass(reroute.routed_class, type(attention)):
        raise ConversionError(f"cannot reroute {type(attention).__name__} to {reroute.routed_class.__name__}, which is "
                              "not a subclass of it")
    if reroute.routed_class is None:
        attention.qkv_bias_separate = True
        return
    swap_class(attention, reroute.routed_class)
    if ic is not None:
        attention.ic = ic


register_reroute(nn.Module, _separable_qkv_bias, reason="timm attention with a qkv_bias_separate flag")
register_reroute(nn.MultiheadAttention, _packed_self_attention, routes_to=[RoutedMultiheadAttention],
                 reason="torch MultiheadAttention as self-attention")
register_reroute(ShiftedWindowAttention, _shifted_window(ShiftedWindowAttention, RoutedShiftedWindowAttention),
                 routes_to=[RoutedShiftedWindowAttention], reason="torchvision Swin")
register_reroute(ShiftedWindowAttentionV2, _shifted_window(ShiftedWindowAttentionV2, RoutedShiftedWindowAttentionV2),
                 routes_to=[RoutedShiftedWindowAttentionV2], reason="torchvision Swin V2")
