"""Attention modules that call their weight layers as modules, so that IC blocks on those layers run.

Subclasses of torchvision's ``ShiftedWindowAttention(V2)`` and of ``nn.MultiheadAttention``
that compute the same function as their base class with the projections called as modules
(see ``icrewrite.rewrite`` for when a module is rerouted to one of them). They keep the
module's name, parameters and state-dict keys, and ``isinstance`` holds; they are defined at
module level so converted models pickle.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

from ..errors import ConversionError
from .ic import IC

__all__ = ["RoutedShiftedWindowAttention", "RoutedShiftedWindowAttentionV2", "RoutedMultiheadAttention"]


# --- torchvision's shifted-window attention, split around its two projections ---------------------
# The three steps are wrapped for torch.fx (as torchvision wraps shifted_window_attention), so a
# trace of the routed module shows ``qkv`` and ``proj`` as module calls between them.

def _padded(size: int, window: int) -> int:
    """``size`` rounded up to a whole number of windows."""
    return size + (window - size % window) % window


def _windows(x: Tensor, window_size: list[int], shift_size: list[int]) -> tuple[Tensor, list[int]]:
    """``x`` (B, H, W, C) zero-padded to whole windows, rolled by the shift and cut into windows
    (B * windows, Wh * Ww, C); and the shift used (none along a side one window covers)."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = _padded(height, window_size[0]), _padded(width, window_size[1])
    x = F.pad(x, (0, 0, 0, pad_w - width, 0, pad_h - height))
    shift = [0 if window_size[0] >= pad_h else shift_size[0], 0 if window_size[1] >= pad_w else shift_size[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(batch, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size[0] * window_size[1], channels), shift


def _shift_mask(pad_h: int, pad_w: int, window_size: list[int], shift: list[int], like: Tensor) -> Tensor:
    """(windows, tokens, tokens): -100 between tokens that the cyclic shift brought together."""
    regions = like.new_zeros((pad_h, pad_w))
    h_slices = ((0, -window_size[0]), (-window_size[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size[1]), (-window_size[1], -shift[1]), (-shift[1], None))
    for i, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        regions[h[0]:h[1], w[0]:w[1]] = i
    regions = regions.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window_size[0] * window_size[1])
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _window_attention(qkv: Tensor, relative_position_bias: Tensor, x: Tensor, window_size: list[int],
                      shift: list[int], num_heads: int, logit_scale: Tensor | None, attention_dropout: float,
                      training: bool) -> Tensor:
    """Multi-head attention inside each window, from the projected ``qkv`` (B * windows, tokens,
    3C) of input ``x`` to the heads' output (B * windows, tokens, C), before ``proj``."""
    windows, tokens, channels = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.reshape(windows, tokens, 3, num_heads, channels // num_heads).permute(2, 0, 3, 1, 4)
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * (channels // num_heads) ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift) > 0:
        pad_h, pad_w = _padded(x.shape[1], window_size[0]), _padded(x.shape[2], window_size[1])
        mask = _shift_mask(pad_h, pad_w, window_size, shift, x)
        attn = attn.view(-1, mask.shape[0], num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(windows, tokens, channels)


def _merge_windows(windows: Tensor, x: Tensor, window_size: list[int], shift: list[int]) -> Tensor:
    """The inverse of :func:`_windows`: windows back to the layout and size of ``x``."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = _padded(height, window_size[0]), _padded(width, window_size[1])
    y = windows.view(batch, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], channels)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
    return y[:, :height, :width, :].contiguous()


for _step in ("_windows", "_window_attention", "_merge_windows"):
    fx.wrap(_step)


class RoutedShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` with ``qkv`` and ``proj`` called as modules.

    Computes torchvision's ``shifted_window_attention``, which takes the two weights as
    tensors, step by step around the two projections.
    """

    def forward(self, x: Tensor) -> Tensor:
        windows, shift = _windows(x, self.window_size, self.shift_size)
        qkv = self.qkv(windows)
        logit_scale = getattr(self, "logit_scale", None)
        if logit_scale is not None and self.qkv.bias is not None:
            third = self.qkv.out_features // 3
            qkv = qkv - F.pad(self.qkv.bias[third:2 * third], (third, third))  # V2 uses no key bias
        out = _window_attention(qkv, self.get_relative_position_bias(), x, self.window_size, shift, self.num_heads,
                                logit_scale, self.attention_dropout, self.training)
        out = F.dropout(self.proj(out), p=self.dropout, training=self.training)
        return _merge_windows(out, x, self.window_size, shift)


class RoutedShiftedWindowAttentionV2(RoutedShiftedWindowAttention, ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` (cosine attention, continuous position bias)
    with ``qkv`` and ``proj`` called as modules."""


# --- nn.MultiheadAttention as self-attention ----------------------------------------------------

class RoutedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` for packed, unmasked self-attention, ``out_proj`` called as a module.

    ``mha(x, x, x)`` projects ``self.ic(x)`` with ``in_proj_weight`` (a raw parameter, so its
    IC block lives on the attention) and computes what ``F.multi_head_attention_forward``
    does. Any other call raises ``ConversionError``: only attention seen called as
    self-attention is rerouted.
    """

    ic: IC

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if not (query is key is value) or key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ConversionError("this MultiheadAttention was converted for unmasked self-attention "
                                  "(query is key is value); it cannot be called otherwise")
        x = query if self.batch_first else query.transpose(0, 1)  # (batch, tokens, embed_dim)
        batch, tokens, _ = x.shape
        qkv = F.linear(self.ic(x), self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        weights = None
        if need_weights:
            weights = torch.softmax((q * self.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
            weights = F.dropout(weights, p=self.dropout, training=self.training)
            out = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights
