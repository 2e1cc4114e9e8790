"""A small bundled example model (plain torch, no model zoo) for ``fxadapt inspect --example`` and docs.

``example_model()`` is a CIFAR-style ResNet: a conv/BN/ReLU stem, two stages of basic residual blocks (the
first block of stage 2 downsamples through a projection shortcut, the last block carries a
squeeze-and-excitation gate) and a pooled linear classifier head. Input ``EXAMPLE_INPUT_SHAPE``.

Example:
    >>> import torch
    >>> from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
    >>> model = example_model()
    >>> model(torch.randn(*EXAMPLE_INPUT_SHAPE)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import torch
from torch import nn

EXAMPLE_INPUT_SHAPE = (1, 3, 32, 32)


class SqueezeExcite(nn.Module):
    """Channel gate ``x * sigmoid(fc2(relu(fc1(mean(x)))))`` with 1x1 convolutions as the FC layers."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class BasicBlock(nn.Module):
    """``relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))``; projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = SqueezeExcite(cout) if se else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.se(self.bn2(self.conv2(y)))
        return torch.relu(self.shortcut(x) + y)


class ExampleResNet(nn.Module):
    """Stem (16 channels) -> stage 1 (2 blocks, 16) -> stage 2 (2 blocks, 32, SE in the last) -> head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.stage2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2),
                                    BasicBlock(2 * width, 2 * width, se=True))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def example_model(num_classes: int = 10, seed: int = 0) -> ExampleResNet:
    """The bundled example (eval mode), initialised from ``seed`` without touching the global RNG state.

    >>> sum(p.numel() for p in example_model().parameters())
    43778
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ExampleResNet(num_classes).eval()
