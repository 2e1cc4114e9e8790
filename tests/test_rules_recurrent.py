"""LSTM / GRU: the hidden size is one group across gate blocks, layers and directions; input size from the
producer; MACs by hand; growth function-preserving (GRU end to end; LSTM through the plan, because
``FlopCounterMode`` does not count the CPU LSTM kernel, see ``fxadapt.ops.recurrent``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fxadapt.passes.materialize import apply_plan
from ruletools import group_with, half_flops, member
from torch import nn

import fxadapt
from fxadapt.planning.plan import growth_blocker, make_plan


class RNN(nn.Module):
    def __init__(self, kind="LSTM", layers=1, bidirectional=False, bias=True):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.rnn = getattr(nn, kind)(8, 12, layers, bias=bias, batch_first=True, bidirectional=bidirectional)
        self.out = nn.Linear(12 * (2 if bidirectional else 1), 3)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0])


def seeded(*args):
    """float32: the default zero state ``aten.zeros(..., dtype=float32)`` is rewritten only at the default
    dtype (the materializer drops keyword arguments; see ``fxadapt.ops.edits.droppable``)."""
    torch.manual_seed(0)
    return RNN(*args).eval()


def x4(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def hand_macs(gates, layers, dirs, t=7, b=1, i=8, h=12):
    """Linear layers + T*B*D*G*H*(I_l + H) per layer (I_l = D*H after the first)."""
    rnn = sum(t * b * dirs * gates * h * ((i if k == 0 else dirs * h) + h) for k in range(layers))
    return t * b * (5 * 8 + h * dirs * 3) + rnn


CASES = [("LSTM", 4, 1, False, True), ("LSTM", 4, 2, True, True), ("GRU", 3, 2, False, True),
         ("GRU", 3, 1, True, False)]


@pytest.mark.parametrize("kind,gates,layers,bidir,bias", CASES)
def test_hidden_size_is_one_group_over_gates_layers_directions(kind, gates, layers, bidir, bias):
    m = seeded(kind, layers, bidir, bias)
    x = x4(1, 7, 5)
    a = fxadapt.analyze(m, (x,))
    assert a.fired[kind.lower()] == 1
    g = group_with(a, "rnn.weight_hh_l0", 1)
    assert (g.width, g.units, g.granularity, g.prunable) == (12 * gates, 12, gates, True)
    np.testing.assert_array_equal(member(g, "rnn.weight_ih_l0", 0).index, np.tile(np.arange(12), gates))
    if layers > 1:
        dirs = 2 if bidir else 1
        np.testing.assert_array_equal(member(g, "rnn.weight_ih_l1", 1).index, np.tile(np.arange(12), dirs))
    assert group_with(a, "inp.weight", 0) is not g and group_with(a, "inp.weight", 0).prunable
    assert a.macs() == hand_macs(gates, layers, 2 if bidir else 1)
    assert growth_blocker(a, g) is None


@pytest.mark.parametrize("kind,gates,layers,bidir,bias", CASES)
def test_growth_is_function_preserving_and_shrink_runs(kind, gates, layers, bidir, bias):
    m = seeded(kind, layers, bidir, bias)
    x = x4(2, 7, 5)
    a = fxadapt.analyze(m, (x4(1, 7, 5),))
    g = group_with(a, "rnn.weight_hh_l0", 1)
    big = apply_plan(a.gm, make_plan(a, {g.id: 17})).graph_module
    assert big.get_parameter("rnn.weight_hh_l0").shape == (17 * gates, 17)
    torch.testing.assert_close(big(x), m(x), rtol=1e-5, atol=1e-6)
    small = apply_plan(a.gm, make_plan(a, {g.id: 5})).graph_module
    assert small(x).shape == (2, 7, 3)
    assert a.macs(channels={g.id: 5 * gates}) == hand_macs(gates, layers, 2 if bidir else 1, h=5)


def test_gru_transforms_both_ways_without_warnings_per_call():
    torch.manual_seed(0)
    m = RNN("GRU", 2).eval()
    x = torch.randn(1, 7, 5)
    for budget in (0.5, 1.5):
        out = fxadapt.transform(m, budget, (x,))
        rep = fxadapt.report(out)
        assert abs(rep.macs_after / rep.macs_before - budget) <= 0.02 * budget
        assert rep.macs_after == half_flops(out, x)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out(x)
        if budget > 1:
            torch.testing.assert_close(out(x), m(x), rtol=1e-4, atol=1e-5)
