"""The meta probe reads the input features of a weight layer off its own conv/linear call."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from icrewrite.rewrite import probe_weight_use

CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FunctionalConv(nn.Module):
    """Only ``weight``: pads (any mode), then ``F.conv{rank}d``."""

    def __init__(self, rank: int, channels_in: int, groups: int, kernel: int, pad: str) -> None:
        super().__init__()
        self.rank, self.groups, self.pad = rank, groups, pad
        self.weight = nn.Parameter(torch.empty(2 * groups, channels_in // groups, *[kernel] * rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad != "none":
            x = F.pad(x, (1, 1) * self.rank, mode=self.pad)
        return CONVS[self.rank](x, self.weight, groups=self.groups)


class FunctionalLinear(nn.Module):
    def __init__(self, features_in: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, features_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def probed(layer: nn.Module, input_size: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    model = nn.Sequential(layer)
    model.pretrained_cfg = {"input_size": input_size}
    return probe_weight_use(model, ["0"]).input_features


@settings(max_examples=60, deadline=None)
@given(rank=st.sampled_from([1, 2, 3]), groups=st.integers(1, 3), per_group=st.integers(1, 4),
       kernel=st.integers(1, 3), pad=st.sampled_from(["none", "constant", "reflect", "replicate", "circular"]))
def test_a_convolution_reads_dim_1_of_its_input(rank, groups, per_group, kernel, pad):
    channels = groups * per_group
    layer = FunctionalConv(rank, channels, groups, kernel, pad)
    assert probed(layer, (channels, *[4] * rank)) == {"0": (channels, 1)}


@settings(max_examples=40, deadline=None)
@given(features=st.integers(1, 9), leading=st.lists(st.integers(1, 4), max_size=2))
def test_a_linear_map_reads_the_last_dim_of_its_input(features, leading):
    assert probed(FunctionalLinear(features), (*leading, features)) == {"0": (features, -1)}


def test_a_weight_applied_by_another_module_or_to_a_reshaped_input_gives_no_features():
    class Borrows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = FunctionalLinear(6), FunctionalLinear(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + F.linear(x, self.b.weight)  # b never runs: its weight is applied here

    class Flattens(FunctionalLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x.flatten(1), self.weight)

    model = Borrows()
    model.pretrained_cfg = {"input_size": (6,)}
    usage = probe_weight_use(model, ["a", "b"])
    assert usage.input_features == {"a": (6, -1)} and usage.weight_used_outside == {"b"}
    assert probed(Flattens(12), (3, 2, 2)) == {}
