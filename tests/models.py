"""Small hand-built models shared by the back-end tests (fast on CPU, one rule family each)."""

from __future__ import annotations

import torch
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ResNetTiny(nn.Module):
    """stem -> 2 identity residual blocks -> projection block -> head (BN stats randomised)."""

    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.stem = cbr(3, c)
        self.b1 = nn.Sequential(cbr(c, c), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b2 = nn.Sequential(cbr(c, c), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.proj = nn.Conv2d(c, 2 * c, 1)
        self.b3 = nn.Sequential(cbr(c, 2 * c), nn.Conv2d(2 * c, 2 * c, 3, padding=1))
        self.head = nn.Linear(2 * c, classes)
        randomize_bn(self)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(x + self.b2(x))
        x = torch.relu(self.proj(x) + self.b3(x))
        return self.head(x.mean((2, 3)))


class PlainNet(nn.Module):
    """stem -> residual block -> widening conv -> head, without BatchNorm: every sample's output and loss
    depend on that sample alone (the distributed tests compare N ranks with one process on it)."""

    def __init__(self, c: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.wide = nn.Conv2d(c, 2 * c, 3, padding=1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.body(x))
        x = torch.relu(self.wide(x))
        return self.head(x.mean((2, 3)))


def resnet_tiny_macs(c: int = 8, hw: int = 16, classes: int = 5) -> int:
    """ResNetTiny's MACs written out layer by layer: stem, 2 x (2 convs), proj, b3 (2 convs), head."""
    px = hw * hw
    return (px * c * 3 * 9 + 2 * 2 * px * c * c * 9 + px * 2 * c * c + px * 2 * c * c * 9
            + px * 2 * c * 2 * c * 9 + 2 * c * classes)


class CatSplit(nn.Module):
    """Two branches concatenated, a chunk split, depthwise conv and a flatten -> linear head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = cbr(3, 6), cbr(3, 10)
        self.dw = cbr(16, 16, groups=16)
        self.mix = cbr(16, 12, k=1)
        self.left, self.right = cbr(6, 4, k=1), cbr(6, 4, k=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)
        randomize_bn(self)

    def forward(self, x):
        y = self.mix(self.dw(torch.cat([self.a(x), self.b(x)], 1)))
        lo, hi = torch.chunk(y, 2, dim=1)
        z = torch.cat([self.left(lo), self.right(hi)], 1)
        z = nn.functional.adaptive_avg_pool2d(z, 4)
        return self.fc(z.view(z.size(0), -1))


class LatencyNet(nn.Module):
    """Three conv stages with a residual join, a depthwise conv and a linear head: several groups, some wide
    (the latency tests' model)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(96, 160, 3, padding=1), nn.ReLU(), nn.Conv2d(160, 96, 1))
        self.dw = nn.Conv2d(96, 96, 3, padding=1, groups=96)
        self.b = nn.Sequential(nn.Conv2d(96, 200, 1), nn.ReLU(), nn.Conv2d(200, 6, 1))
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        return self.head(self.b(self.dw(x)).mean((2, 3)))


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affine so folding and slicing are really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
