"""passes.fold_bn: how many BNs were folded, what is left, and eval numerics vs the unfolded graph."""

from __future__ import annotations

import pytest
import torch
from fxadapt.passes.fold_bn import fold_bn
from models import randomize_bn
from torch import nn

from fxadapt import capture

X = torch.randn(2, 4, 8, 8)


def bns(gm):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


@pytest.mark.parametrize("layer", [
    nn.Conv2d(4, 6, 3, bias=False),
    nn.Conv2d(4, 6, 3, bias=True),
    nn.Conv2d(4, 8, 3, groups=2),                  # grouped
    nn.Conv2d(4, 8, 3, groups=4),                  # depthwise, multiplier 2
    nn.ConvTranspose2d(4, 6, 3, stride=2),         # transposed
    nn.ConvTranspose2d(4, 6, 3, groups=2),         # grouped transposed
], ids=["conv", "conv_bias", "grouped", "depthwise", "transposed", "grouped_transposed"])
def test_fold_conv_variants(layer):
    model = nn.Sequential(layer, nn.BatchNorm2d(layer.out_channels), nn.ReLU())
    randomize_bn(model)
    model.eval()
    gm = capture(model, (X,))
    res = fold_bn(gm)
    assert res.modified and res.graph_module.meta["fxadapt.folded_bn"] == 1
    assert bns(res.graph_module) == 0 and bns(gm) == 1          # the input graph is untouched
    torch.testing.assert_close(res.graph_module(X), model(X), rtol=1e-5, atol=1e-5)


def test_fold_linear_and_skip_unfoldable():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6), nn.ReLU(),
                          nn.BatchNorm1d(6))
    randomize_bn(model)
    model.eval()
    gm = capture(model, (X,))
    res = fold_bn(gm)
    assert res.graph_module.meta["fxadapt.folded_bn"] == 1        # the BN after ReLU cannot fold
    assert bns(res.graph_module) == 1
    torch.testing.assert_close(res.graph_module(X), model(X), rtol=1e-5, atol=1e-5)


def test_nothing_to_fold_reports_unmodified():
    gm = capture(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()), (X,))
    res = fold_bn(gm)
    assert not res.modified and res.graph_module.meta["fxadapt.folded_bn"] == 0
