"""The IC block and the weight layers that carry one.

``IC`` is BatchNorm followed by Dropout (Chen et al., arXiv 1905.05928). A converted
weight layer keeps its class, name and parameters: its class is swapped for a subclass
(``IC<Base>``, created once per base class) whose ``forward`` applies ``self.ic`` to the
input first. ``isinstance`` checks and state-dict keys of the layer stay as they were,
and ``torch.fx``, ``torch.compile`` and the ONNX exporters see the IC because it is
plain module code, not a hook.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..compat import register_notrace_module
from ..errors import ConversionError
from . import fast as fast_ic

__all__ = [
    "IC",
    "ICBatchNorm",
    "ICWeightLayer",
    "ic_class",
    "attach_ic",
    "ic_base",
    "bn_affine",
    "swap_class",
    "IC_BASES",
    "feature_columns",
    "check_probability",
]


@register_notrace_module
class ICBatchNorm(_BatchNorm):
    """BatchNorm over dim 1 of an input of any rank >= 2 (``(N, C, *)``).

    A ``_BatchNorm`` so that ``nn.SyncBatchNorm.convert_sync_batchnorm`` and every tool
    that looks for BatchNorm layers finds it. ``F.batch_norm`` checks the rank itself, so
    there is no Python-level check that would stop ``torch.fx`` from tracing through it.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass


@torch.no_grad()
def bn_affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm: ``BN(x) = scale * x + shift`` per channel."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if getattr(norm, "weight", None) is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if getattr(norm, "bias", None) is not None:
        shift = shift + norm.bias
    return scale, shift


class IC(nn.Module):
    """Independent-Component block: ``Dropout_p(BatchNorm(x))``.

    Args:
        num_features: features of the input that the next weight layer consumes.
        p: dropout probability (the paper uses about 0.05).
        feature_dim: ``1`` for convolution inputs ``(N, C, *)``; ``-1`` for ``Linear``
            inputs ``(*, C)`` such as ``(B, N, C)`` tokens.
        eps, momentum: as in ``nn.BatchNorm2d``.

    In eval mode it is the per-feature affine map returned by :meth:`affine`. In CPU
    training, and in CUDA training where the CUDA path chooses the Triton kernels
    (:func:`icrewrite.layers.fast.set_cuda_path`; the default on CUDA is the reference), it
    runs the fused path of :mod:`icrewrite.layers.fast` where that applies (same values,
    running statistics and gradients; a cheaper mask); set ``fast = False`` on an instance or
    on the class for the reference ``Dropout(BatchNorm(x))`` modules.

    In training, a batch with at most one value per feature (a batch of one before a
    ``Linear``, such as an incomplete last batch reaching the classifier) has no batch
    statistics: BatchNorm would raise. The block then normalises with its running
    statistics, leaves them (and ``num_batches_tracked``) unchanged, and still applies
    dropout, so such a batch trains the rest of the model as the original would.
    """

    fast: bool = True

    def __init__(
        self,
        num_features: int,
        p: float = 0.05,
        *,
        feature_dim: int = 1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if feature_dim not in (1, -1):
            raise ConversionError(f"feature_dim must be 1 (convolution input) or -1 (Linear input), got {feature_dim}")
        check_probability(p)
        self.feature_dim = feature_dim
        self.norm = ICBatchNorm(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.drop = nn.Dropout(p)

    @property
    def num_features(self) -> int:
        return self.norm.num_features

    @property
    def p(self) -> float:
        return self.drop.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm.training and _one_value_per_feature(self.norm, x, self.feature_dim):
            return self.drop(self._by_running_stats(x))
        if self.fast and fast_ic.applies(self.norm, self.drop, x, self.feature_dim):
            y = fast_ic.norm_dropout(self.norm, self.p, self._features(x))
            return y if self.feature_dim == 1 else y.view(x.shape)
        if self.feature_dim == 1:
            x = self.norm(x)
        else:
            x = self.norm(x.flatten(0, -2)).reshape(x.shape)
        return self.drop(x)

    def _by_running_stats(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised by the running statistics, which stay as they are (BatchNorm's eval-mode map)."""
        norm = self.norm
        y = F.batch_norm(self._features(x), norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0,
                         norm.eps)
        return y if self.feature_dim == 1 else y.view(x.shape)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the features along dim 1, as BatchNorm takes it: Linear inputs ``(*, C)`` flattened to ``(M, C)``."""
        return x if self.feature_dim == 1 else x.flatten(0, -2)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` with ``IC(x) == scale * x + shift`` per feature in eval mode."""
        return bn_affine(self.norm)

    @torch.no_grad()
    def set_identity(self, mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> None:
        """Set running statistics to ``(mean, var)`` and the affine so that eval mode is the identity.

        Train mode then normalises a batch and maps it back to the scale ``(mean, var)``,
        so a converted network starts from the function it had.
        """
        norm = self.norm
        if mean is not None:
            norm.running_mean.copy_(mean)
        if var is not None:
            norm.running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(norm.running_var + norm.eps))
        norm.bias.copy_(norm.running_mean)

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}, feature_dim={self.feature_dim}"


class ICWeightLayer(nn.Module):
    """Mixin of the ``IC<Base>`` classes: apply ``self.ic`` to the input, then the base layer.

    In CPU training (and CUDA training on the Triton path) a plain convolution or ``Linear`` and its
    IC block run as one operator (:func:`icrewrite.layers.fast.norm_dropout_layer`): the same values,
    statistics and gradients, but backward rebuilds the IC output instead of keeping it.
    """

    ic: IC

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        call = None if args or kwargs else self._fused_call(x)
        if call is None:
            return super().forward(self.ic(x), *args, **kwargs)
        ic = self.ic
        out = fast_ic.norm_dropout_layer(ic.norm, ic.p, ic._features(x), call, self.weight, self.bias)
        return out if ic.feature_dim == 1 else out.view(*x.shape[:-1], out.shape[-1])

    def _fused_call(self, x: torch.Tensor) -> fast_ic.LayerCall | None:
        """How the fused operator calls this layer on ``x``; ``None`` where the IC block runs on its own."""
        ic = self.ic
        if not (ic.fast and type(ic).forward is IC.forward and fast_ic.applies(ic.norm, ic.drop, x, ic.feature_dim)):
            return None
        return fast_ic.layer_call(ic, self, ic_base(type(self)), x)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Rebuild through ic_class so that pickle (torch.save, multiprocessing) and
        # deepcopy find the dynamically created class in a fresh process.
        reduced = super().__reduce_ex__(protocol)
        return (_new_ic_layer, (ic_base(type(self)),)) + tuple(reduced[2:])


def _one_value_per_feature(norm: nn.Module, x: torch.Tensor, feature_dim: int) -> bool:
    """Whether a training-mode IC block gets at most one value per feature in ``x`` (a batch of one before a
    ``Linear``, an incomplete last batch, an empty one), where batch statistics are undefined: it then normalises
    with the running statistics. Not for tracers (a symbolic shape decides nothing), a BatchNorm without running
    statistics, or a SyncBatchNorm, whose statistics span every process (all of which must call it alike)."""
    if (isinstance(x, torch.fx.Proxy) or not isinstance(norm, _BatchNorm) or isinstance(norm, nn.SyncBatchNorm)
            or not norm.track_running_stats):
        return False
    return x.dim() >= 2 and x.numel() <= x.shape[feature_dim]


def ic_base(cls: type[nn.Module]) -> type[nn.Module]:
    """The original weight-layer class behind an ``IC<Base>`` class."""
    return next(b for b in cls.__mro__[1:] if b is not ICWeightLayer and not issubclass(b, ICWeightLayer))


# Classes whose subclasses can be the base of an IC layer: the registered weight-layer classes
# (``icrewrite.registry`` adds each one), so that ``icrewrite.layers.IC<Base>`` resolves by name.
IC_BASES: set[type[nn.Module]] = set()


@functools.cache
def ic_class(base: type[nn.Module]) -> type[nn.Module]:
    """The ``IC<Base>`` subclass of a weight-layer class (one per base class)."""
    if issubclass(base, ICWeightLayer):
        return base
    return type(f"IC{base.__name__}", (ICWeightLayer, base), {"__module__": "icrewrite.layers", "__doc__": base.__doc__})


def _new_ic_layer(base: type[nn.Module]) -> nn.Module:
    cls = ic_class(base)
    return cls.__new__(cls)


def swap_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """Make ``module`` an instance of ``cls`` in place: its name, parameters, buffers and hooks stay.

    How icrewrite changes what a module computes without changing its state-dict keys:
    ``cls`` is a subclass of the module's class (``IC<Base>``, a routed attention, a
    border-corrected conv) or, to undo one, its base; both read the same attributes.
    """
    if not (issubclass(cls, type(module)) or issubclass(type(module), cls)):
        raise TypeError(f"cannot turn a {type(module).__name__} into an unrelated {cls.__name__}")
    module.__class__ = cls
    return module


def attach_ic(layer: nn.Module, ic: IC) -> nn.Module:
    """Give ``layer`` the IC block ``ic`` in place, keeping its name, parameters and hooks."""
    swap_class(layer, ic_class(type(layer)))
    layer.ic = ic
    return layer


def feature_columns(x: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """A weight layer's input as a ``(samples, features)`` matrix: features are dim 1 of a
    convolution input ``(N, C, *)`` (``feature_dim=1``) or the last dim of ``(*, C)`` (``-1``)."""
    x = x.movedim(1, -1) if feature_dim == 1 else x
    return x.reshape(-1, x.shape[-1])


def check_probability(p: float, name: str = "p") -> float:
    """``p`` if it is a dropout probability IC accepts (``0 <= p < 1``; NaN is not), else a
    ``ConversionError`` naming it ``name``."""
    if not 0.0 <= p < 1.0:
        raise ConversionError(f"{name} must be in [0, 1), got {p}")
    return p
