"""Capture under code that users' models run in forward: a module conversion that changes nothing (Switch
Transformers' router calls ``self.classifier.to(self.dtype)`` every forward) is traced as the no-op it is;
one that changes a tensor still fails with the hint; value-dependent loops get a hint that says what to
change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import CaptureError
from fxadapt.ir.capture import noop_conversions

X = torch.randn(2, 8)


class ConvertsItsHead(nn.Module):
    def __init__(self, dtype=None):
        super().__init__()
        self.body, self.head, self.dtype = nn.Linear(8, 16), nn.Linear(16, 4), dtype

    def forward(self, x):
        self.head = self.head.to(self.dtype or self.body.weight.dtype).float()
        return self.head(torch.relu(self.body(x)))


def test_a_conversion_that_changes_nothing_is_traced_and_adapted():
    model = ConvertsItsHead().eval()
    out = fxadapt.transform(model, 0.5, (X,))
    assert type(out) is ConvertsItsHead and out.body.out_features < 16
    assert out(torch.randn(5, 8)).shape == (5, 4)          # and it still runs its own forward
    assert fxadapt.analysis.count.count_macs(out, (X,)) \
            <= 0.5 * fxadapt.analysis.count.count_macs(model, (X,))


def test_a_conversion_that_changes_a_tensor_still_fails_with_the_hint():
    with pytest.raises(CaptureError, match="forward converts a Linear module"):
        fxadapt.transform(ConvertsItsHead(torch.float64).eval(), 0.5, (X,))


def test_the_shim_is_scoped_and_exact():
    m = nn.Linear(2, 2)
    with noop_conversions():
        assert m.to(torch.float32) is m and m.float() is m and m.to("cpu") is m
        assert m.double().weight.dtype == torch.float64        # a real change runs
    assert nn.Module.to is not None and m.float().weight.dtype == torch.float32   # restored


class RoutesByValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.router = nn.Linear(8, 3)

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e in choice.unique():                               # a loop over tensor values
            out = out + self.experts[int(e)](x)
        return out


def test_a_value_dependent_loop_says_what_to_change():
    with pytest.raises(CaptureError, match="branches or loops on tensor values") as info:
        fxadapt.transform(RoutesByValue().eval(), 0.5, (X,))
    assert "\n" not in str(info.value) and "experts_implementation='grouped_mm'" in str(info.value)
