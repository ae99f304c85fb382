"""Small hand-built networks, one per pattern the conversion must handle, and timm models as the tests make them."""
from __future__ import annotations

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.utils.data import DataLoader, Subset

import icrewrite
from icrewrite.checkpoint import create_timm_model
from icrewrite.train.data import DigitsDataset


class ConvBnRelu(nn.Sequential):
    def __init__(self, cin: int, cout: int, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Chain(nn.Module):
    """conv-bn-relu chain ending in a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnRelu(3, 8)
        self.body = nn.Sequential(ConvBnRelu(8, 16), ConvBnRelu(16, 16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


class Residual(nn.Module):
    """ResNet BasicBlock: conv-bn-relu-conv-bn + skip, relu."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnRelu(3, 8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.relu(x + y).mean((2, 3)))


class Dense(nn.Module):
    """DenseNet-style concatenation with pre-activation BN-ReLU-conv (BN input is a concat)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.norm2, self.conv2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.conv1(nn.functional.relu(self.norm1(x)))], 1)
        x = torch.cat([x, self.conv2(nn.functional.relu(self.norm2(x)))], 1)
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """Depthwise conv + SE gating (conv-relu-conv-sigmoid multiply), as in MobileNet/EfficientNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBnRelu(3, 8)
        self.dw = ConvBnRelu(8, 8, groups=8)
        self.se_reduce, self.se_expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.grouped = ConvBnRelu(8, 8, groups=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.dw(self.stem(x))
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        return self.fc(self.grouped(x * s).mean((2, 3)))


class Tokens(nn.Module):
    """Linear layers on (B, N, C) tokens, and one tensor feeding two weight layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        attn = (self.q(t) @ self.k(t).transpose(1, 2)).softmax(-1)
        pooled = (attn @ t).mean(1)
        return self.fc2(nn.functional.gelu(self.bn(self.fc1(pooled))))


class FusedNormAct(nn.Module):
    """timm's BatchNormAct2d after a conv, and a BatchNorm whose input has a second consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_act = BatchNormAct2d(8, act_layer=nn.SiLU)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_shared = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.bn_act(self.stem(x))
        y = self.conv(x)
        z = torch.relu(self.bn_shared(y)) + y  # y also feeds the add: bn_shared cannot fold
        return self.fc(z.mean((2, 3)))


PATTERNS = {
    "chain": Chain,
    "residual": Residual,
    "dense": Dense,
    "squeeze_excite": SqueezeExcite,
    "tokens": Tokens,
    "fused_norm_act": FusedNormAct,
}


def timm_model(name: str, **kwargs) -> nn.Module:
    """A randomly initialised timm model; ViTs at 32x32 so the tests' small inputs fit."""
    if name.startswith("vit"):
        kwargs.setdefault("img_size", 32)
    return timm.create_model(name, pretrained=False, **kwargs)


# timm's smallest CNN; test_resnet is in timm >= 1.0.10, older timm gets resnet10t (slower, same role)
SMALL_CNN = "test_resnet" if timm.is_model("test_resnet") else "resnet10t"

TINY = dict(channels=(8, 16, 32, 64), stem_width=8, num_classes=10)  # a quarter-width resnet18, 0.2M parameters


def tiny_resnet(**convert: object) -> nn.Module:
    """The quarter-width resnet18 with weights seeded 0 (recording its arguments, for checkpoints);
    converted with ``init="fresh"`` and ``convert`` when options are given."""
    torch.manual_seed(0)
    model = create_timm_model("resnet18", **TINY)
    return icrewrite.convert(model, init="fresh", **convert) if convert else model


def tiny_digit_loaders(batch_size: int = 32, samples: int = 128, img_size: int = 8) -> tuple[DataLoader, DataLoader]:
    """``samples`` training digits in full batches, and 64 test digits in one batch, at ``img_size``."""
    train = DataLoader(Subset(DigitsDataset("train", img_size), range(samples)), batch_size=batch_size,
                       drop_last=True)
    return train, DataLoader(Subset(DigitsDataset("test", img_size), range(64)), batch_size=64)
