"""Channel rules of parametric layers: conv (plain, depthwise, grouped, transposed), linear, batch/group/
layer norm. Exact partitions, unit maps, fired counts, and MACs = FlopCounterMode / 2."""

from __future__ import annotations

import numpy as np
import torch
from ruletools import (
    analyze,
    check_slicing,
    group_with,
    groups_with,
    half_flops,
    kinds,
    member,
    n_params,
    param_members,
)
from torch import nn
from torch.nn import functional as F

D = torch.float64


def x4(*shape):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(0))


def seeded(cls, *args):
    torch.manual_seed(0)
    m = cls(*args).to(D)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(bn.weight, 1, 0.3)
    return m.eval()


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, stride=2, bias=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).mean((2, 3)))


def test_conv_bn_chain_partition():
    m, x = seeded(Chain), x4(1, 3, 9, 9)
    a = analyze(m, x)
    assert len(a.groups) == 3
    g1, g2, head = group_with(a, "c1.weight", 0), group_with(a, "c2.weight", 0), group_with(a, "fc.weight", 0)
    assert param_members(g1) == {("c1.weight", 0, "out"), ("c1.bias", 0, "bias"), ("bn.weight", 0, "norm"),
                                 ("bn.bias", 0, "norm"), ("bn.running_mean", 0, "norm"),
                                 ("bn.running_var", 0, "norm"), ("c2.weight", 1, "in")}
    assert param_members(g2) == {("c2.weight", 0, "out"), ("fc.weight", 1, "in")}
    assert (g1.width, g1.units, g1.granularity, g1.prunable) == (8, 8, 1, True)
    assert (g2.width, g2.units, g2.granularity, g2.prunable) == (6, 6, 1, True)
    assert not head.prunable and "reaches the model output" in head.reason
    for mem in g1.members:
        np.testing.assert_array_equal(mem.index, np.arange(8))
    assert g1.name == "c1" and g2.name == "c2"
    assert a.fired["conv"] == 2 and a.fired["batch_norm"] == 1 and a.fired["linear"] == 1
    assert a.fired["unary"] == 2 and a.fired["reduce"] == 1
    assert a.macs() == half_flops(m, x) == 3 * 8 * 9 * 81 + 8 * 6 * 9 * 16 + 6 * 5
    assert a.params() == n_params(m)
    # widths are in channels: dropping 3 of c1's channels and 2 of c2's
    assert a.macs(channels={g1.id: 5, g2.id: 4}) == 3 * 5 * 9 * 81 + 5 * 4 * 9 * 16 + 4 * 5
    assert a.blocks == []
    check_slicing(a, (x4(2, 3, 9, 9),))


class Depthwise(nn.Module):
    def __init__(self, mult: int = 1):
        super().__init__()
        self.pw = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(4, 4 * mult, 3, padding=1, groups=4, bias=mult == 1)
        self.bn = nn.BatchNorm2d(4 * mult)
        self.out = nn.Conv2d(4 * mult, 5, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn(self.dw(F.relu(self.pw(x))))))


def test_depthwise_conv_shares_the_producer_group():
    m, x = seeded(Depthwise), x4(1, 3, 6, 6)
    a = analyze(m, x)
    g = group_with(a, "pw.weight", 0)
    assert groups_with(a, "dw.weight") == [g]
    assert param_members(g) == {("pw.weight", 0, "out"), ("pw.bias", 0, "bias"), ("dw.weight", 0, "dw"),
                                ("dw.bias", 0, "bias"), ("bn.weight", 0, "norm"), ("bn.bias", 0, "norm"),
                                ("bn.running_mean", 0, "norm"), ("bn.running_var", 0, "norm"),
                                ("out.weight", 1, "in")}
    groups_site = [mem for mem in g.members if mem.site.kind == "groups"]
    assert len(groups_site) == 1 and groups_site[0].site.node_name == "dw"
    np.testing.assert_array_equal(groups_site[0].index, np.arange(4))
    assert (g.width, g.units, g.granularity, g.prunable) == (4, 4, 1, True)
    assert len(a.groups) == 2 and a.fired["conv"] == 3
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 6, 6),))


def test_depthwise_multiplier_repeats_units():
    m, x = seeded(Depthwise, 2), x4(1, 3, 6, 6)
    a = analyze(m, x)
    g = group_with(a, "pw.weight", 0)
    assert (g.width, g.units, g.granularity) == (4, 4, 1)
    np.testing.assert_array_equal(member(g, "dw.weight", 0).index, np.repeat(np.arange(4), 2))
    np.testing.assert_array_equal(member(g, "out.weight", 1).index, np.repeat(np.arange(4), 2))
    np.testing.assert_array_equal(member(g, "bn.running_var", 0).index, np.repeat(np.arange(4), 2))
    assert a.macs() == half_flops(m, x)
    assert a.macs() == (3 * 4 + 8 * 9 + 8 * 5) * 36
    assert a.macs(channels={g.id: 2}) == (3 * 2 + 4 * 9 + 4 * 5) * 36  # pw, dw and out all follow pw's width
    check_slicing(a, (x4(2, 3, 6, 6),))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.c2(F.relu(self.g(F.relu(self.c1(x)))))


def test_grouped_conv_granularity_is_groups():
    m, x = seeded(Grouped), x4(1, 3, 5, 5)
    a = analyze(m, x)
    gin, gout = group_with(a, "c1.weight", 0), group_with(a, "g.weight", 0)
    # input channels viewed as [4 groups, 2]: position k of every group is one unit
    assert (gin.width, gin.units, gin.granularity, gin.prunable) == (8, 2, 4, True)
    np.testing.assert_array_equal(member(gin, "c1.weight", 0).index, np.tile(np.arange(2), 4))
    # weight's in axis is per group
    np.testing.assert_array_equal(member(gin, "g.weight", 1).index, np.arange(2))
    assert (gout.width, gout.units, gout.granularity, gout.prunable) == (12, 3, 4, True)
    np.testing.assert_array_equal(member(gout, "g.weight", 0).index, np.tile(np.arange(3), 4))
    np.testing.assert_array_equal(member(gout, "c2.weight", 1).index, np.tile(np.arange(3), 4))
    assert not [mem for g in a.groups for mem in g.members if mem.site.kind == "groups"]  # groups stays 4
    assert a.macs() == half_flops(m, x)
    # g: 8 out x 1 in x 3x3
    assert a.macs(channels={gin.id: 4, gout.id: 8}) == 3 * 4 * 25 + 8 * 1 * 9 * 25 + 8 * 5 * 25
    check_slicing(a, (x4(2, 3, 5, 5),))


class GN(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(groups, 8)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c2(self.gn(self.c1(x)))


def test_group_norm_couples_positions_across_groups():
    m, x = seeded(GN, 2), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "c1.weight", 0)
    assert (g.width, g.units, g.granularity, g.prunable) == (8, 4, 2, True)
    assert {("gn.weight", 0, "norm"), ("gn.bias", 0, "norm"), ("c2.weight", 1, "in")} <= param_members(g)
    np.testing.assert_array_equal(member(g, "gn.weight", 0).index, np.tile(np.arange(4), 2))
    assert a.fired["group_norm"] == 1
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),), exact=False)  # a norm over channels mixes them: shapes only


def test_group_norm_with_one_group_is_free():
    a = analyze(seeded(GN, 1), x4(1, 3, 4, 4))
    g = group_with(a, "c1.weight", 0)
    assert (g.width, g.units, g.granularity) == (8, 8, 1)


class ChannelsLast(nn.Module):
    """ConvNeXt-style: conv, then LayerNorm + MLP over channels in NHWC, added back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 12)
        self.fc2 = nn.Linear(12, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        z = self.fc2(F.gelu(self.fc1(self.ln(y.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.out(y + z)


def test_layer_norm_and_linear_over_permuted_channels():
    m, x = seeded(ChannelsLast), x4(1, 3, 5, 5)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert param_members(g) == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias"), ("ln.weight", 0, "norm"),
                                ("ln.bias", 0, "norm"), ("fc1.weight", 1, "in"), ("fc2.weight", 0, "out"),
                                ("fc2.bias", 0, "bias"), ("out.weight", 1, "in")}
    shape = [mem for mem in g.members if mem.site.kind == "shape_arg"]
    assert [(s.site.node_name, s.site.index) for s in shape] == [("ln", 0)]  # normalized_shape[0]
    hidden = group_with(a, "fc1.weight", 0)
    assert param_members(hidden) \
            == {("fc1.weight", 0, "out"), ("fc1.bias", 0, "bias"), ("fc2.weight", 1, "in")}
    assert g.prunable and hidden.prunable and len(a.groups) == 3
    assert a.fired["permute"] == 2 and a.fired["layer_norm"] == 1 and a.fired["linear"] == 2
    [b] = a.blocks
    assert (b.entry, b.exit, b.removable, b.repeatable) == ("conv", "add", True, True)
    assert b.body == ("permute", "ln", "fc1", "gelu", "fc2", "permute_1")
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 5, 5),), exact=False)  # layer norm mixes channels
    check_slicing(a, (x4(2, 3, 5, 5),), fixed=lambda a: {g.id: set(range(g.units))})  # only hidden: exact


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.t = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.o = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.o(F.relu(self.t(F.relu(self.c(x)))))


def test_transposed_conv_weight_axes():
    m, x = seeded(Transposed), x4(1, 3, 4, 4)
    a = analyze(m, x)
    assert param_members(group_with(a, "c.weight", 0)) == {("c.weight", 0, "out"), ("c.bias", 0, "bias"),
                                                         ("t.weight", 0, "in")}
    assert param_members(group_with(a, "t.weight", 1)) == {("t.weight", 1, "out"), ("t.bias", 0, "bias"),
                                                         ("o.weight", 1, "in")}
    assert a.fired["conv_transpose"] == 1 and a.fired["conv"] == 2
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),))


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, ids):
        return self.fc2(F.relu(self.fc1(self.emb(ids)))).mean(1)


def test_embedding_and_linear_on_sequences():
    m = seeded(Tokens)
    ids = torch.randint(0, 10, (1, 7), generator=torch.Generator().manual_seed(0))
    a = analyze(m, ids)
    assert param_members(group_with(a, "emb.weight", 1)) \
            == {("emb.weight", 1, "out"), ("fc1.weight", 1, "in")}
    assert param_members(group_with(a, "fc1.weight", 0)) \
            == {("fc1.weight", 0, "out"), ("fc1.bias", 0, "bias"),
                                                           ("fc2.weight", 1, "in")}
    assert not group_with(a, "fc2.weight", 0).prunable
    assert a.fired["embedding"] == 1 and a.fired["linear"] == 2
    assert a.macs() == half_flops(m, ids) == 7 * (8 * 16 + 16 * 3)
    assert a.params() == n_params(m)
    check_slicing(a, (torch.randint(0, 10, (2, 7), generator=torch.Generator().manual_seed(1)),))


def test_member_kinds_of_a_plain_group():
    a = analyze(seeded(Chain), x4(1, 3, 9, 9))
    assert kinds(group_with(a, "c2.weight", 0)) == {"param": 2}


class Tied(nn.Module):
    """One weight read by two linears: both inputs must keep the same features."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return F.linear(self.a(x).mean((2, 3)), self.w) + F.linear(self.b(x).amax((2, 3)), self.w)


def test_tied_weight_couples_its_readers():
    m, x = seeded(Tied), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "a.weight", 0)
    assert groups_with(a, "b.weight", 0) == [g]
    assert param_members(g) == {("a.weight", 0, "out"), ("a.bias", 0, "bias"), ("b.weight", 0, "out"),
                                ("b.bias", 0, "bias"), ("w", 1, "in")}
    assert g.prunable and g.units == 8
    assert set(dict(a.gm.named_parameters())) == set(dict(m.named_parameters()))
    assert a.fired["linear"] == 2
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 1)
        self.u1, self.u2 = nn.Sequential(shared, nn.ReLU()), nn.Sequential(shared)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(self.u2(self.u1(self.stem(x))))


def test_module_reused_twice_is_one_tensor_and_one_group():
    m, x = seeded(SharedConv), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "stem.weight", 0)
    # u1's input, u1's output (= u2's input) and u2's output are one tensor's axes: all coupled
    assert param_members(g) \
            == {("stem.weight", 0, "out"), ("stem.bias", 0, "bias"), ("u1.0.weight", 0, "out"),
                                ("u1.0.weight", 1, "in"), ("u1.0.bias", 0, "bias"), ("out.weight", 1, "in")}
    assert g.prunable and len(a.groups) == 2
    assert a.macs() == half_flops(m, x)
    assert a.params() == n_params(m)
    check_slicing(a, (x4(2, 3, 4, 4),))
