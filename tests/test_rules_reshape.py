"""Channel rules of ops that move channels around: channel shuffle (view/transpose/reshape), pixel shuffle,
flatten -> linear, attention heads, permute/transpose."""

from __future__ import annotations

import numpy as np
import torch
from ruletools import (  # noqa: E402
    analyze,
    check_slicing,
    group_with,
    half_flops,
    kinds,
    member,
    param_members,
    seeded,
    x4,
)
from torch import nn
from torch.nn import functional as F


class Shuffle(nn.Module):
    def __init__(self, groups: int, builtin: bool = False):
        super().__init__()
        self.groups, self.builtin = groups, builtin
        self.a = nn.Conv2d(3, 12, 1)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.a(x)
        if self.builtin:
            y = F.channel_shuffle(y, self.groups)
        else:
            n, c, h, w = y.shape
            y = y.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.c(y)


def test_channel_shuffle_permutes_member_indices():
    g_, per = 3, 4
    m, x = seeded(Shuffle, g_), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "a.weight", 0)
    # [g, C/g] -> transpose: a unit is one intra-group position, kept in every group (g stays fixed)
    assert (g.width, g.units, g.granularity, g.prunable) == (12, per, g_, True)
    prod = member(g, "a.weight", 0).index
    cons = member(g, "c.weight", 1).index
    np.testing.assert_array_equal(prod, np.tile(np.arange(per), g_))
    perm = np.arange(12).reshape(g_, per).T.reshape(-1)  # shuffled position j holds channel perm[j]
    np.testing.assert_array_equal(cons, prod[perm])
    np.testing.assert_array_equal(cons, np.repeat(np.arange(per), g_))
    shapes = sorted((mem.site.node_name, mem.site.index, mem.index.tolist()) for mem in g.members
                    if mem.site.kind == "shape_arg")
    assert shapes == [("reshape", 1, np.repeat(np.arange(per), g_).tolist()), ("view", 2, list(range(per)))]
    assert a.fired["view"] == 2 and a.fired["permute"] == 1
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),))


def test_builtin_channel_shuffle_matches_the_view_version():
    a = analyze(seeded(Shuffle, 3, True), x4(1, 3, 4, 4))
    g = group_with(a, "a.weight", 0)
    assert (g.units, g.granularity) == (4, 3)
    np.testing.assert_array_equal(member(g, "c.weight", 1).index, np.repeat(np.arange(4), 3))
    check_slicing(a, (x4(2, 3, 4, 4),))


class PixelShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(2, 4, 3, padding=1)
        self.c = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        y = self.b(F.pixel_shuffle(self.a(x), 2))  # [8, H, W] -> [2, 2H, 2W]
        return self.c(F.pixel_unshuffle(y, 2))     # [4, 2H, 2W] -> [16, H, W]


def test_pixel_shuffle_and_unshuffle():
    m, x = seeded(PixelShuffle), x4(1, 3, 3, 3)
    a = analyze(m, x)
    ga = group_with(a, "a.weight", 0)
    assert (ga.width, ga.units, ga.granularity, ga.prunable) == (8, 2, 4, True)  # granularity r^2
    np.testing.assert_array_equal(member(ga, "a.weight", 0).index, np.repeat(np.arange(2), 4))
    np.testing.assert_array_equal(member(ga, "b.weight", 1).index, np.arange(2))
    gb = group_with(a, "b.weight", 0)
    assert (gb.width, gb.units, gb.granularity, gb.prunable) == (4, 4, 1, True)
    np.testing.assert_array_equal(member(gb, "c.weight", 1).index, np.repeat(np.arange(4), 4))
    assert a.fired["pixel_shuffle"] == 1 and a.fired["pixel_unshuffle"] == 1
    assert a.macs() == half_flops(m, x)
    assert a.macs(channels={ga.id: 4, gb.id: 2}) == 9 * 3 * 4 + 36 * 1 * 2 * 9 + 9 * 8 * 5
    check_slicing(a, (x4(2, 3, 3, 3),))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(torch.flatten(F.relu(self.conv(x)), 1))))


def test_flatten_to_linear_repeats_units_hw_times():
    m, x = seeded(FlattenHead), x4(1, 3, 3, 3)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert param_members(g) == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias"), ("fc.weight", 1, "in")}
    assert (g.width, g.units, g.granularity) == (4, 4, 1)
    np.testing.assert_array_equal(member(g, "fc.weight", 1).index, np.repeat(np.arange(4), 9))
    assert kinds(g) == {"param": 3}  # flatten.using_ints has no int shape list to rewrite
    assert a.fired["view"] == 1
    assert a.macs() == half_flops(m, x)
    assert a.macs(channels={g.id: 1}) == 9 * 27 * 1 + 1 * 9 * 6 + 6 * 2
    check_slicing(a, (x4(2, 3, 3, 3),))


class ViewHead(nn.Module):
    """Flatten written as ``view(n, -1)`` and as ``reshape(n, C*H*W)``: the int entry is a shape site."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 4, 3)
        self.fc2 = nn.Linear(4 * 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1)) + self.fc2(y.reshape(y.shape[0], 16))


def test_view_and_reshape_flatten():
    m, x = seeded(ViewHead), x4(1, 3, 2, 2)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    np.testing.assert_array_equal(member(g, "fc.weight", 1).index, np.repeat(np.arange(4), 4))
    np.testing.assert_array_equal(member(g, "fc2.weight", 1).index, np.repeat(np.arange(4), 4))
    shapes = [(mem.site.node_name, mem.site.index) for mem in g.members if mem.site.kind == "shape_arg"]
    assert shapes == [("reshape", 1)]  # the -1 of the view needs no rewrite
    check_slicing(a, (x4(2, 3, 2, 2),))


class Unflatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x).flatten(1)             # [N, C*H*W]
        return self.out(y.unflatten(1, (8, 3, 3)))


def test_unflatten_sizes_are_a_shape_site():
    m, x = seeded(Unflatten), x4(1, 3, 3, 3)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    [shape] = [mem for mem in g.members if mem.site.kind == "shape_arg"]
    assert (shape.site.node_name, shape.site.arg, shape.site.index) == ("unflatten", 2, 0)
    np.testing.assert_array_equal(shape.index, np.arange(8))
    assert a.fired["view"] == 2
    check_slicing(a, (x4(2, 3, 3, 3),))


class Attention(nn.Module):
    def __init__(self, heads=2, dim=8):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, c // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, c // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1) * (c // h) ** -0.5).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, n, c))


def test_attention_heads_keep_head_count_and_prune_head_dim():
    m, x = seeded(Attention), x4(1, 5, 8)
    a = analyze(m, x)
    qk = group_with(a, "q.weight", 0)
    assert group_with(a, "k.weight", 0) is qk  # q.k^T contracts head_dim: q and k prune together
    assert {("q.weight", 0, "out"), ("q.bias", 0, "bias"), ("k.weight", 0, "out"), ("k.bias", 0, "bias")} == \
        param_members(qk)
    assert (qk.width, qk.units, qk.granularity, qk.prunable) == (8, 4, 2, True)
    np.testing.assert_array_equal(member(qk, "q.weight", 0).index, np.tile(np.arange(4), 2))
    assert sorted((mem.site.node_name, mem.site.index) for mem in qk.members
                  if mem.site.kind == "shape_arg") == \
        [("view", 3), ("view_1", 3)]
    v = group_with(a, "v.weight", 0)
    assert param_members(v) == {("v.weight", 0, "out"), ("v.bias", 0, "bias"), ("o.weight", 1, "in")}
    assert (v.width, v.units, v.granularity, v.prunable) == (8, 4, 2, True)
    np.testing.assert_array_equal(member(v, "o.weight", 1).index, np.tile(np.arange(4), 2))
    assert sorted((mem.site.node_name, mem.site.index) for mem in v.members
                  if mem.site.kind == "shape_arg") == \
        [("reshape", 2), ("view_2", 3)]
    assert not group_with(a, "o.weight", 0).prunable
    assert a.fired["matmul"] == 2 and a.fired["view"] == 4 and a.fired["linear"] == 4
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(3, 5, 8),), exact=False)  # q.k^T mixes head_dim: shapes and costs only
    # with q/k kept whole, dropping v's head_dim only removes what o would multiply by zero: exact
    check_slicing(a, (x4(3, 5, 8),), fixed=lambda a: {qk.id: set(range(qk.units))})


class SDPAttention(Attention):
    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, c // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, c // h).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_scaled_dot_product_attention_heads():
    m, x = seeded(SDPAttention), x4(1, 5, 8)
    a = analyze(m, x)
    qk, v = group_with(a, "q.weight", 0), group_with(a, "v.weight", 0)
    assert group_with(a, "k.weight", 0) is qk and qk is not v
    assert (qk.units, qk.granularity, v.units, v.granularity) == (4, 2, 4, 2)
    assert param_members(v) == {("v.weight", 0, "out"), ("v.bias", 0, "bias"), ("o.weight", 1, "in")}
    assert a.fired["sdpa"] == 1
    assert a.macs() == half_flops(m, x) == 4 * 5 * 8 * 8 + 2 * 5 * 5 * (4 + 4)
    check_slicing(a, (x4(3, 5, 8),), exact=False)
    check_slicing(a, (x4(3, 5, 8),), fixed=lambda a: {qk.id: set(range(qk.units))})


class NHWCLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.fc(self.conv(x).permute(0, 2, 3, 1))
        return self.out(y.transpose(1, 3).transpose(2, 3))


def test_permute_and_transpose_carry_channels():
    m, x = seeded(NHWCLinear), x4(1, 3, 4, 5)
    a = analyze(m, x)
    assert param_members(group_with(a, "conv.weight", 0)) \
            == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias"),
                                                            ("fc.weight", 1, "in")}
    assert param_members(group_with(a, "fc.weight", 0)) == {("fc.weight", 0, "out"), ("fc.bias", 0, "bias"),
                                                          ("out.weight", 1, "in")}
    assert len(a.prunable) == 2 and a.fired["permute"] == 3
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 5),))


class SpatialPermute(nn.Module):
    """A linear over the width axis while channels sit on axis 1: channels pass, the linear is separate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(5, 5)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(self.fc(self.conv(x)))


def test_linear_over_a_spatial_axis_freezes_its_own_outputs_only():
    m, x = seeded(SpatialPermute), x4(1, 3, 4, 5)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert g.prunable and ("out.weight", 1, "in") in param_members(g)
    fc = group_with(a, "fc.weight", 0)
    assert not fc.prunable and "untracked axis" in fc.reason
    check_slicing(a, (x4(2, 3, 4, 5),))
