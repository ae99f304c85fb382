"""Random small networks built from the blocks the conversion must handle (for hypothesis)."""
from __future__ import annotations

import torch
from hypothesis import strategies as st
from timm.layers import BatchNormAct2d
from torch import nn

ACTS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "hardswish": nn.Hardswish}
KINDS = ("conv_bn_act", "fused", "residual", "depthwise", "concat", "squeeze_excite", "conv_only")


class Block(nn.Module):
    """One block of kind ``kind`` on ``c`` channels; output channels in ``out_channels``."""

    def __init__(self, kind: str, c: int, act: str) -> None:
        super().__init__()
        self.kind, self.out_channels = kind, c
        act_layer = ACTS[act]
        if kind == "conv_bn_act":
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act_layer())
        elif kind == "fused":
            self.body = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), BatchNormAct2d(c, act_layer=act_layer))
        elif kind == "residual":
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), act_layer(),
                                      nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        elif kind == "depthwise":
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c),
                                      act_layer(), nn.Conv2d(c, c, 1))
        elif kind == "concat":
            self.body = nn.Sequential(nn.BatchNorm2d(c), act_layer(), nn.Conv2d(c, 4, 3, padding=1))
            self.out_channels = c + 4
        elif kind == "squeeze_excite":
            self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 4, 1), act_layer(), nn.Conv2d(4, c, 1),
                                      nn.Sigmoid())
        else:
            self.body = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.kind == "residual":
            return torch.relu(x + y)
        if self.kind == "concat":
            return torch.cat([x, y], 1)
        if self.kind == "squeeze_excite":
            return x * y
        return y


class GeneratedNet(nn.Module):
    def __init__(self, kinds: list[str], acts: list[str], width: int, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for kind, act in zip(kinds, acts):
            blocks.append(Block(kind, c, act))
            c = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@st.composite
def networks(draw) -> GeneratedNet:
    depth = draw(st.integers(1, 4))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=depth, max_size=depth))
    acts = draw(st.lists(st.sampled_from(sorted(ACTS)), min_size=depth, max_size=depth))
    return GeneratedNet(kinds, acts, width=draw(st.sampled_from([4, 8])))
