"""What a converted model contains: the IC block, weight layers that carry one, rerouted
attention and, after deployment folding, border-corrected convolutions.

Everything here is plain module code (no hooks), so ``torch.fx``, ``torch.compile``,
pickling and the ONNX exporters see it. ``ICConv2d``, ``ICLinear`` and the other
``IC<Base>`` classes are made on first use (``ic_class``) and importable by name.
"""
from __future__ import annotations

from .attention import RoutedMultiheadAttention, RoutedShiftedWindowAttention, RoutedShiftedWindowAttentionV2
from .border import BorderCorrectedConv1d, BorderCorrectedConv2d, BorderCorrectedConv3d
from .ic import _new_ic_layer  # noqa: F401  (named by pickles of 0.1.0: icrewrite.layers._new_ic_layer)
from .ic import (IC, ICBatchNorm, ICWeightLayer, attach_ic, bn_affine, check_probability,
                 IC_BASES, feature_columns, ic_base, ic_class, swap_class)

__all__ = [
    "IC", "ICBatchNorm", "ICWeightLayer", "ic_class", "ic_base", "attach_ic", "bn_affine", "swap_class",
    "feature_columns", "check_probability",
    "RoutedShiftedWindowAttention", "RoutedShiftedWindowAttentionV2", "RoutedMultiheadAttention",
    "BorderCorrectedConv1d", "BorderCorrectedConv2d", "BorderCorrectedConv3d",
]


def _subclasses(cls: type) -> list[type]:
    return [cls] + [s for sub in cls.__subclasses__() for s in _subclasses(sub)]


def __getattr__(name: str) -> type:
    """``icrewrite.layers.ICConv2d`` and friends: the ``IC<Base>`` class of the weight-layer class
    named ``<Base>`` (a registered class or a subclass of one, see ``IC_BASES``). Of several
    classes of that name the base one wins (``nn.Conv2d`` over its quantisation-aware subclass)."""
    if name.startswith("IC"):
        named = {cls for root in IC_BASES for cls in _subclasses(root)
                 if cls.__name__ == name[2:] and not issubclass(cls, ICWeightLayer)}
        bases = {cls for cls in named if not any(cls is not other and issubclass(cls, other) for other in named)}
        if len(bases) == 1:
            return ic_class(bases.pop())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
