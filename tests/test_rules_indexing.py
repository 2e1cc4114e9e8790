"""Channel rules of cat, split/chunk, slice, select and matrix products."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ruletools import (  # noqa: E402
    analyze,
    check_slicing,
    group_with,
    groups_with,
    half_flops,
    member,
    param_members,
    seeded,
    x4,
)
from torch import nn
from torch.nn import functional as F


class Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.c = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1))


def test_cat_group_is_a_slice_of_the_concatenation():
    m, x = seeded(Cat), x4(1, 3, 5, 5)
    a = analyze(m, x)
    ga, gb = group_with(a, "a.weight", 0), group_with(a, "b.weight", 0)
    assert ga is not gb and ga.prunable and gb.prunable
    assert groups_with(a, "c.weight", 1) == [ga, gb]
    assert param_members(ga) == {("a.weight", 0, "out"), ("a.bias", 0, "bias"), ("c.weight", 1, "in")}
    assert param_members(gb) == {("b.weight", 0, "out"), ("b.bias", 0, "bias"), ("c.weight", 1, "in")}
    ia, ib = member(ga, "c.weight", 1).index, member(gb, "c.weight", 1).index
    np.testing.assert_array_equal(ia, np.r_[np.arange(8), np.full(16, -1)])
    np.testing.assert_array_equal(ib, np.r_[np.full(8, -1), np.arange(16)])
    assert (ga.width, ga.units, gb.width, gb.units) == (8, 8, 16, 16)
    assert a.fired["cat"] == 1 and a.fired["conv"] == 3
    assert a.macs() == half_flops(m, x)
    assert a.macs(channels={ga.id: 2, gb.id: 10}) == 25 * (3 * 2 + 3 * 10 * 9 + 12 * 4)
    check_slicing(a, (x4(2, 3, 5, 5),))


class CatWithInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 5, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([x, self.a(x)], 1))


def test_cat_with_a_fixed_size_tensor_keeps_the_other_part_free():
    m, x = seeded(CatWithInput), x4(1, 3, 4, 4)
    a = analyze(m, x)
    ga = group_with(a, "a.weight", 0)
    assert ga.prunable
    np.testing.assert_array_equal(member(ga, "c.weight", 1).index, np.r_[np.full(3, -1), np.arange(5)])
    [fixed] = [g for g in groups_with(a, "c.weight", 1) if g is not ga]
    assert not fixed.prunable and "fixed-size tensor x" in fixed.reason
    check_slicing(a, (x4(2, 3, 4, 4),))


class CatSpatial(nn.Module):
    """cat along H: both operands must carry the same channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 2))


def test_cat_along_space_couples_channels():
    m, x = seeded(CatSpatial), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "a.weight", 0)
    assert groups_with(a, "b.weight", 0) == [g]
    assert param_members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "bias"), ("b.weight", 0, "out"),
                                ("b.bias", 0, "bias"), ("c.weight", 1, "in")}
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),))


class Split(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.p = nn.Conv2d(3 if how == "split" else 4, 4, 1)
        self.q = nn.Conv2d(5 if how == "split" else 4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        u, v = y.chunk(2, 1) if self.how == "chunk" else torch.split(y, [3, 5], 1)
        return self.p(u) + self.q(v)


@pytest.mark.parametrize("how, sizes", [("chunk", (4, 4)), ("split", (3, 5))])
def test_split_and_chunk_give_every_piece_its_group(how, sizes):
    m, x = seeded(Split, how), x4(1, 3, 4, 4)
    a = analyze(m, x)
    gu, gv = group_with(a, "p.weight", 1), group_with(a, "q.weight", 1)
    assert groups_with(a, "a.weight", 0) == [gu, gv]
    n0, n1 = sizes
    np.testing.assert_array_equal(member(gu, "a.weight", 0).index, np.r_[np.arange(n0), np.full(n1, -1)])
    np.testing.assert_array_equal(member(gv, "a.weight", 0).index, np.r_[np.full(n0, -1), np.arange(n1)])
    for g in (gu, gv):
        [split] = [mem for mem in g.members if mem.site.kind == "split"]
        assert split.site.node_name == ("chunk" if how == "chunk" else "split_with_sizes")
        assert split.site.arg == 1  # the split dim
    assert (gu.units, gv.units) == sizes and gu.prunable and gv.prunable
    assert a.fired["split"] == 1 and a.fired["getitem"] == 2
    out = group_with(a, "p.weight", 0)
    assert groups_with(a, "q.weight", 0) == [out] and not out.prunable  # p(u) + q(v) reaches the output
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),), trials=6)


class SplitSameConsumer(nn.Module):
    """Both halves feed one linear: they still form two groups, so no keep-set can empty a half."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        u, v = self.a(x).chunk(2, 1)
        return self.fc(torch.cat([F.adaptive_avg_pool2d(u, 1), F.adaptive_avg_pool2d(v, 1)], 1).flatten(1))


def test_split_pieces_never_share_a_group():
    m, x = seeded(SplitSameConsumer), x4(1, 3, 4, 4)
    a = analyze(m, x)
    gs = groups_with(a, "a.weight", 0)
    assert [g.units for g in gs] == [3, 3] and all(g.prunable for g in gs)
    check_slicing(a, (x4(2, 3, 4, 4),), trials=6)


class Slice(nn.Module):
    def __init__(self, step: int = 1):
        super().__init__()
        self.step = step
        self.a = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(len(range(2, 7, step)), 4, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(y[:, 2:7:self.step]) + self.d(y)


def test_slice_of_channels():
    m, x = seeded(Slice), x4(1, 3, 4, 4)
    a = analyze(m, x)
    inside, outside = group_with(a, "c.weight", 1), None
    [outside] = [g for g in groups_with(a, "a.weight", 0) if g is not inside]
    np.testing.assert_array_equal(member(inside, "a.weight", 0).index, [-1, -1, 0, 1, 2, 3, 4, -1])
    np.testing.assert_array_equal(member(outside, "a.weight", 0).index, [0, 1, -1, -1, -1, -1, -1, 2])
    np.testing.assert_array_equal(member(inside, "d.weight", 1).index, [-1, -1, 0, 1, 2, 3, 4, -1])
    [sl] = [mem for mem in inside.members if mem.site.kind == "slice"]
    assert (sl.site.arg, sl.site.index) == (2, 7)  # start, end
    assert inside.prunable and outside.prunable
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),), trials=6)


class SliceOfInterleaved(nn.Module):
    """A grouped conv ties channel k to k+3; a slice [0:4) then holds unit 0 twice, units 1 and 2 once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.g = nn.Conv2d(6, 2, 1, groups=2)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.g(y) + self.c(y[:, :4])


def test_units_with_different_multiplicity_in_a_site_are_different_groups():
    m, x = seeded(SliceOfInterleaved), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g0, g12 = groups_with(a, "a.weight", 0)
    np.testing.assert_array_equal(member(g0, "a.weight", 0).index, [0, -1, -1, 0, -1, -1])
    np.testing.assert_array_equal(member(g12, "a.weight", 0).index, [-1, 0, 1, -1, 0, 1])
    np.testing.assert_array_equal(member(g12, "c.weight", 1).index, [-1, 0, 1, -1])
    assert (g12.units, g12.granularity, g12.prunable) == (2, 2, True)
    assert (g0.units, g0.prunable) == (1, False)
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),))  # MACs of every keep-set are a function of the kept count


def test_strided_slice_of_channels_freezes():
    a = analyze(seeded(Slice, 2), x4(1, 3, 4, 4))
    g = group_with(a, "a.weight", 0)
    assert not g.prunable and "strided slice (step 2)" in g.reason


class Select(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.a(x)
        return y[:, 0] + y[:, 1:].mean(1)


def test_select_of_a_channel_freezes():
    a = analyze(seeded(Select), x4(1, 3, 4, 4))
    assert a.prunable == []
    reasons = {g.reason for g in groups_with(a, "a.weight", 0)}
    assert any("select picks one channel position" in r for r in reasons), reasons


class MatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 8)
        self.k = nn.Linear(6, 8)
        self.v = nn.Linear(6, 5)
        self.w = nn.Parameter(torch.randn(5, 7))
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)  # contracts q/k channels
        return self.out((att @ self.v(x)) @ self.w)                     # v's channels, then a parameter


def test_matmul_contractions():
    m, x = seeded(MatMul), x4(1, 4, 6)
    a = analyze(m, x)
    qk = group_with(a, "q.weight", 0)
    assert group_with(a, "k.weight", 0) is qk
    assert {("q.weight", 0, "out"), ("q.bias", 0, "bias"), ("k.weight", 0, "out"), ("k.bias", 0, "bias")} == \
        param_members(qk)
    assert (qk.units, qk.prunable) == (8, True)
    v = group_with(a, "v.weight", 0)
    assert param_members(v) == {("v.weight", 0, "out"), ("v.bias", 0, "bias"), ("w", 0, "in")}
    w = group_with(a, "w", 1)
    assert param_members(w) == {("w", 1, "out"), ("out.weight", 1, "in")}
    assert w.prunable and w.name == "w"
    assert a.fired["matmul"] == 3
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 4, 6),), exact=False)  # dropping q/k channels changes the scores
    check_slicing(a, (x4(2, 4, 6),), fixed=lambda a: {qk.id: set(range(8))})


class Gram(nn.Module):
    """``a^T b``: two channel spaces on two axes of one tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 5)

    def forward(self, x):
        return (self.a(x).transpose(1, 2) @ self.b(x)).flatten(1)


def test_matmul_with_channels_on_two_axes_freezes_both():
    a = analyze(seeded(Gram), x4(1, 4, 6))
    for name in ("a.weight", "b.weight"):
        g = group_with(a, name, 0)
        assert not g.prunable


class Einsum(nn.Module):
    def __init__(self, eq: str):
        super().__init__()
        self.eq = eq
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return torch.einsum(self.eq, self.a(x).flatten(2), self.w).sum(1)


@pytest.mark.parametrize("eq, macs",
                         [("bcl,cd->bld", 8 * 16 * 6), ("bcl,cd->bd", 8 * 6), ("bcl,cd", 8 * 16 * 6)])
def test_einsum_with_a_weight_is_costed_and_sliced(eq, macs):  # the rule itself: tests/test_rules_einsum.py
    m, x = seeded(Einsum, eq), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "a.weight", 0)
    assert g.prunable and ("w", 0, "in") in param_members(g)
    assert a.macs() == half_flops(m, x) == 3 * 8 * 16 + macs  # l is summed before the product in bcl,cd->bd
