"""The ``einsum`` rule (``fxadapt.ops.einsum``): channels follow the equation's letters, the MACs term is the
product of the used letters' sizes (checked against FlopCounterMode), slicing is exact and growth preserves
the function."""

from __future__ import annotations

import pytest
import torch
from ruletools import analyze, check_slicing, group_with, half_flops, param_members, seeded, x4
from torch import nn

import fxadapt
from fxadapt.ops.einsum import parse


def test_parse_expands_ellipsis_and_implicit_output():
    assert parse("...ij,...jk->...ik", [3, 2]) == (["…0", "i", "j"], ["j", "k"], ["…0", "i", "k"])
    assert parse("ij,jk", [2, 2])[-1] == ["i", "k"]
    assert parse("bclhn,bcshn->bclsh", [5, 5])[-1] == list("bclsh")


class EinsumLinear(nn.Module):
    """``einsum("bld,dh->blh", x, W)``: a linear layer written as an einsum, between two linears."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(8, 10))
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        return self.out(torch.relu(torch.einsum("bld,dh->blh", self.a(x), self.w)))


def test_einsum_as_a_linear_layer():
    m, x = seeded(EinsumLinear), x4(1, 5, 6)
    a = analyze(m, x)
    assert a.fired["einsum"] == 1
    d = group_with(a, "a.weight", 0)
    assert d.prunable and param_members(d) == {("a.weight", 0, "out"), ("a.bias", 0, "bias"), ("w", 0, "in")}
    h = group_with(a, "w", 1)
    assert h.prunable and param_members(h) == {("w", 1, "out"), ("out.weight", 1, "in")}
    assert a.macs() == half_flops(m, x) == 5 * (6 * 8 + 8 * 10 + 10 * 4)
    check_slicing(a, (x4(2, 5, 6),))


class EinsumAttention(nn.Module):
    """Scores and mixing written as einsums between activations (batch letter ``b``, contracted
    ``d``/``s``)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 12)
        self.out = nn.Linear(12, 6)

    def forward(self, x):
        s = torch.einsum("bld,bsd->bls", self.q(x), self.k(x)).softmax(-1)
        return self.out(torch.einsum("bls,bsd->bld", s, self.v(x)))


def test_einsum_between_activations_couples_and_passes_through():
    m, x = seeded(EinsumAttention), x4(1, 5, 6)
    a = analyze(m, x)
    assert a.fired["einsum"] == 2
    qk = group_with(a, "q.weight", 0)
    assert qk is group_with(a, "k.weight", 0) and qk.prunable and qk.units == 8
    v = group_with(a, "v.weight", 0)
    assert v.prunable and ("out.weight", 1, "in") in param_members(v)
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 5, 6),), exact=False)  # dropping q/k channels changes the scores
    check_slicing(a, (x4(2, 5, 6),), fixed=lambda a: {qk.id: set(range(8))})


class FixedOperand(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)

    def forward(self, x):
        return torch.einsum("bld,bd->bl", self.a(x), torch.ones(x.shape[0], 8, dtype=x.dtype))


def test_einsum_with_a_fixed_size_activation_freezes_with_a_reason():
    m, x = seeded(FixedOperand), x4(1, 5, 6)
    a = analyze(m, x)
    g = group_with(a, "a.weight", 0)
    assert not g.prunable and "einsum letter 'd' pairs channels with" in g.reason
    assert a.macs() == half_flops(m, x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 3), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.einsum("bi,bj->bji", self.a(x), self.b(x))).flatten(1)


def test_einsum_outer_product_keeps_the_larger_space():
    a = analyze(seeded(Outer), x4(1, 6))
    assert group_with(a, "a.weight", 0).prunable
    small = group_with(a, "b.weight", 0)
    assert not small.prunable and "outer product keeps the larger" in small.reason


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_einsum_transform_shrinks_and_grows(budget):
    m, x = seeded(EinsumLinear), x4(2, 5, 6)
    out = fxadapt.transform(m, budget, (x,))
    assert type(out) is EinsumLinear
    if budget > 1:
        torch.testing.assert_close(out(x), m(x), rtol=1e-6, atol=1e-8)  # growth preserves the function
    assert out.w.shape != m.w.shape
