"""Write-back by re-planning (``fxadapt.pipeline.replan``): a model whose code reads a size at run time
(a conv's output reshaped by its *input*'s channel count, then a LayerNorm) verifies as a graph but fails in
its own modules when the plan sizes the conv's input and output apart; the two groups are tied to one width,
the plan is made again and the user's class comes back at the budget, counted independently, with the tie
in a ``ReplanWarning`` and in the report."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.errors import ReplanWarning
from fxadapt.pipeline import replan
from fxadapt.writeback import WriteBackWarning


class Reduction(nn.Module):
    """SegFormer's sequence reduction in small: the reshape reads the channel count from the conv's input."""

    def __init__(self, c):
        super().__init__()
        self.sr, self.norm = nn.Conv2d(c, c, 2, stride=2), nn.LayerNorm(c)

    def forward(self, x):
        b, c = x.shape[:2]
        return self.norm(self.sr(x).reshape(b, c, -1).permute(0, 2, 1))


class Net(nn.Module):
    def __init__(self, mlp=True):
        super().__init__()
        self.stem, self.reduce = nn.Conv2d(3, 32, 3, padding=1), Reduction(32)
        self.fc = nn.Sequential(nn.Linear(32, 96), nn.ReLU()) if mlp else nn.Identity()
        self.head = nn.Linear(96 if mlp else 32, 10)

    def forward(self, x):
        return self.head(self.fc(self.reduce(torch.relu(self.stem(x)))).mean(1))


def _x(batch=1):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _transform(model, budget):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, budget, (_x(),))
    return out, \
            [w for w in rec
             if issubclass(w.category, (ReplanWarning, WriteBackWarning, fxadapt.BudgetWarning))]


def _net(mlp=True):
    torch.manual_seed(0)
    return Net(mlp).eval()


def test_without_replanning_the_graph_comes_back(monkeypatch):
    """The failure being repaired: with no retries the write-back falls back to the verified graph."""
    monkeypatch.setattr(replan, "RETRIES", 0)
    out, rec = _transform(_net(), 0.5)
    assert isinstance(out, torch.fx.GraphModule)
    assert any(w.category is WriteBackWarning and "reduce.norm (LayerNorm) receives shape" in str(w.message)
               for w in rec)


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_tied_replan_returns_the_users_class_at_the_budget(budget):
    model = _net()
    out, rec = _transform(model, budget)
    assert type(out) is Net
    ratio = count_macs(out, (_x(),)) / count_macs(model, (_x(),))
    assert (1 - 0.01) * budget <= ratio <= budget
    tie, = [str(w.message) for w in rec if w.category is ReplanWarning]
    assert "stem and reduce.sr tied to one width" in tie and "reduce.norm (LayerNorm) receives shape" in tie
    assert not [w for w in rec if w.category is WriteBackWarning]
    c = out.stem.out_channels
    assert c < 32 \
            and out.reduce.sr.in_channels == out.reduce.sr.out_channels \
            == out.reduce.norm.normalized_shape[0] == c
    r = fxadapt.report(out)
    assert r.returned == "module" and r.history[0]["ties"] == [["reduce.sr", "stem"]]
    assert "re-planned: stem and reduce.sr tied to one width" in str(r)
    assert out(_x(batch=3)).shape == (3, 10)


def test_a_reshape_that_fails_inside_the_module_is_tied_too():
    """Without the MLP the sizes do not divide: the reshape itself raises inside ``reduce`` (no module
    receives a wrong shape), and the tie comes from the size argument inside it against its input's group."""
    model = _net(mlp=False)
    out, rec = _transform(model, 0.3)
    assert type(out) is Net
    tie, = [str(w.message) for w in rec if w.category is ReplanWarning]
    assert "stem and reduce.sr tied to one width (reduce (Reduction) fails inside" in tie
    assert count_macs(out, (_x(),)) <= 0.3 * count_macs(model, (_x(),))
    assert out.stem.out_channels == out.reduce.sr.out_channels


def test_segformer_writes_back_after_the_tie():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "SegformerConfig"):
        pytest.skip("this transformers has no SegFormer")
    cfg = transformers.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                       hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                       num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    torch.manual_seed(0)
    model = transformers.SegformerModel(cfg).eval()
    x = {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, 0.5, x)
    assert isinstance(out, transformers.SegformerModel)
    assert any(w.category is ReplanWarning and "sequence_reduction" in str(w.message) for w in rec)
    ratio = count_macs(out, x) / count_macs(model, x)
    assert 0.99 * 0.5 <= ratio <= 0.5
