"""Channel rules of element-wise and broadcasting ops (residual add, SE multiply, constants), reductions,
residual blocks found by dominance, and ops without a rule (frozen with the op's name, never element-wise)."""

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
    n_params,
    param_members,
    seeded,
    x4,
)
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.c2(F.relu(self.c1(x)))
        return self.head(x.mean((2, 3)))


class Stem(nn.Module):
    """``Residual`` with its block removed (``y = x``)."""

    def __init__(self, r: Residual):
        super().__init__()
        self.stem, self.head = r.stem, r.head

    def forward(self, x):
        return self.head(F.relu(self.stem(x)).mean((2, 3)))


def test_residual_add_couples_both_convs():
    m, x = seeded(Residual), x4(1, 3, 6, 6)
    a = analyze(m, x)
    g = group_with(a, "stem.weight", 0)
    assert groups_with(a, "c2.weight", 0) == [g]
    assert param_members(g) == {("stem.weight", 0, "out"), ("stem.bias", 0, "bias"), ("c1.weight", 1, "in"),
                                ("c2.weight", 0, "out"), ("c2.bias", 0, "bias"), ("head.weight", 1, "in")}
    assert (g.width, g.units, g.granularity, g.prunable) == (8, 8, 1, True)
    mid = group_with(a, "c1.weight", 0)
    assert param_members(mid) == {("c1.weight", 0, "out"), ("c1.bias", 0, "bias"), ("c2.weight", 1, "in")}
    assert (mid.width, mid.prunable) == (6, True)
    assert len(a.groups) == 3 and not group_with(a, "head.weight", 0).prunable
    assert a.fired["broadcast"] == 1 and a.fired["conv"] == 3 and a.fired["reduce"] == 1
    assert a.macs() == half_flops(m, x)
    assert a.params() == n_params(m)
    check_slicing(a, (x4(2, 3, 6, 6),))


def test_identity_residual_block_is_removable_and_repeatable():
    m, x = seeded(Residual), x4(1, 3, 6, 6)
    a = analyze(m, x)
    [b] = a.blocks
    assert (b.entry, b.exit, b.removable, b.repeatable, b.reason) == ("relu", "add", True, True, None)
    assert b.body == ("c1", "relu_1", "c2")
    # the cost model knows the block: without it, MACs are the stem + head of the model
    assert a.macs(present={b.id: 0}) == half_flops(Stem(m), x)
    assert a.macs(present={b.id: 1}) == a.macs()
    assert a.params(present={b.id: 0}) == n_params(Stem(m))


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.body = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1))
        self.proj = nn.Conv2d(6, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.out(F.relu(self.proj(x) + self.body(x)))


def test_projection_shortcut_is_a_block_that_cannot_be_removed():
    m, x = seeded(Projection), x4(1, 3, 5, 5)
    a = analyze(m, x)
    [b] = a.blocks
    assert (b.entry, b.exit, b.removable, b.repeatable) == ("relu", "add", False, False)
    assert "projection" in b.reason
    assert b.body == ("proj", "body_0", "relu_1", "body_2")
    g = group_with(a, "proj.weight", 0)
    assert groups_with(a, "body.2.weight", 0) == [g]  # both branches' outputs are added: one group
    assert {("proj.weight", 0, "out"), ("body.2.weight", 0, "out"), ("out.weight", 1, "in")} \
            <= param_members(g)
    assert param_members(group_with(a, "stem.weight", 0)) \
            == {("stem.weight", 0, "out"), ("stem.bias", 0, "bias"),
                                                            ("proj.weight", 1, "in"),
                                                            ("body.0.weight", 1, "in")}
    assert a.macs() == half_flops(m, x)
    assert a.macs(present={b.id: 0}) == a.macs()  # not removable: no presence variable
    check_slicing(a, (x4(2, 3, 5, 5),))


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.out(y * gate)


def test_se_multiply_couples_gate_and_trunk():
    m, x = seeded(SE), x4(1, 3, 6, 6)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert param_members(g) == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias"), ("fc1.weight", 1, "in"),
                                ("fc2.weight", 0, "out"), ("fc2.bias", 0, "bias"), ("out.weight", 1, "in")}
    for mem in g.members:
        np.testing.assert_array_equal(mem.index, np.arange(8))
    assert param_members(group_with(a, "fc1.weight", 0)) \
            == {("fc1.weight", 0, "out"), ("fc1.bias", 0, "bias"),
                                                           ("fc2.weight", 1, "in")}
    assert len(a.prunable) == 2
    assert a.fired["broadcast"] == 1 and a.fired["pool"] == 1 and a.fired["conv"] == 4
    assert a.blocks == []  # a product is not a residual
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 6, 6),))


class SpatialGate(nn.Module):
    """A one-channel map broadcast over the channels (spatial attention)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.att = nn.Conv2d(8, 1, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.out(y * torch.sigmoid(self.att(y)))


def test_one_channel_broadcast_does_not_couple():
    m, x = seeded(SpatialGate), x4(1, 3, 5, 5)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert param_members(g) == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias"), ("att.weight", 1, "in"),
                                ("out.weight", 1, "in")}
    assert g.prunable
    att = group_with(a, "att.weight", 0)
    assert not att.prunable and "one-channel tensor broadcast over channels" in att.reason
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 5, 5),))


class Offsets(nn.Module):
    def __init__(self, fixed_input: bool):
        super().__init__()
        self.fixed_input = fixed_input
        self.conv = nn.Conv2d(3, 8, 1)
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.register_buffer("scale", torch.rand(8, 1, 1) + 0.5)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x, extra):
        y = (self.conv(x) + self.shift) * self.scale
        if self.fixed_input:
            y = y + extra
        return self.out(y)


def test_parameter_and_buffer_operands_are_sliced_with_the_channels():
    m = seeded(Offsets, False)
    x, extra = x4(1, 3, 4, 4), x4(1, 8, 4, 4, seed=1)
    a = analyze(m, x, extra)
    g = group_with(a, "conv.weight", 0)
    assert param_members(g) == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias"), ("shift", 1, "const"),
                                ("scale", 0, "const"), ("out.weight", 1, "in")}
    assert g.prunable and a.fired["broadcast"] == 2
    check_slicing(a, (x4(2, 3, 4, 4), x4(2, 8, 4, 4, seed=2)))


def test_adding_a_fixed_size_input_freezes():
    m = seeded(Offsets, True)
    a = analyze(m, x4(1, 3, 4, 4), x4(1, 8, 4, 4, seed=1))
    g = group_with(a, "conv.weight", 0)
    assert not g.prunable and "combined with fixed-size tensor extra" in g.reason


class Where(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.out(torch.where(y > 0.1, y, self.b(x)))


def test_where_with_a_comparison_mask_couples_its_operands():
    m, x = seeded(Where), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "a.weight", 0)
    assert groups_with(a, "b.weight", 0) == [g] and g.prunable
    assert ("out.weight", 1, "in") in param_members(g)
    assert a.fired["unary"] == 1 and a.fired["broadcast"] == 1 and a.fired["blocked"] == 0
    check_slicing(a, (x4(2, 3, 4, 4),))


class ChannelStats(nn.Module):
    """Reductions: over channels (consumes them) and over space (passes them)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(x)
        y = y - y.mean(1, keepdim=True)
        return self.fc(y.amax((2, 3)))


def test_reductions():
    m, x = seeded(ChannelStats), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert g.prunable and ("fc.weight", 1, "in") in param_members(g)
    assert a.fired["reduce"] == 2 and a.fired["broadcast"] == 1
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),), exact=False)  # a mean over channels changes with their count


# --- ops without a rule
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fxadapt_test::channel_mix", mutates_args=())
def channel_mix(x: torch.Tensor) -> torch.Tensor:
    return x.flip(1).clone()


@channel_mix.register_fake
def _(x):
    return torch.empty_like(x)


class Unknown(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.op(self.conv(x)))


UNKNOWN = {
    "cumprod": (lambda y: torch.cumprod(y, 1), "aten.cumprod.default"),
    "logcumsumexp": (lambda y: torch.logcumsumexp(y, 1), "aten.logcumsumexp.default"),  # sort has a rule now
    "cummax_spatial": (lambda y: torch.cummax(y, 2).values, "aten.cummax.default"),
    "custom_op": (lambda y: channel_mix(y), "fxadapt_test.channel_mix.default"),
    "fft": (lambda y: torch.fft.fft(y, dim=1).abs(), "aten.fft_fft.default"),
}


@pytest.mark.parametrize("name", list(UNKNOWN))
def test_op_without_rule_freezes_with_its_name(name):
    fn, op = UNKNOWN[name]
    m, x = seeded(Unknown, fn), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert not g.prunable
    assert f"no channel rule for {op}" in g.reason
    assert a.fired["blocked"] == 1
    # never element-wise: the consumer's input channels are not tied to the producer
    assert param_members(g) == {("conv.weight", 0, "out"), ("conv.bias", 0, "bias")}
    assert not groups_with(a, "out.weight", 1)
    assert a.prunable == []
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 3, 4, 4),))  # nothing prunable: the slicer keeps everything, exactly


class Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.flip(1) * 2

    @staticmethod
    def backward(ctx, g):
        return g.flip(1) * 2


def test_custom_autograd_function_is_traced_through_and_its_channel_flip_freezes():
    m, x = seeded(Unknown, Reverse.apply), x4(1, 3, 4, 4)
    a = analyze(m, x)
    g = group_with(a, "conv.weight", 0)
    assert not g.prunable and "flip re-indexes the channel axis" in g.reason
    assert a.fired["gather_like"] == 1 and a.fired["broadcast"] == 1  # flip, then * 2
    assert not groups_with(a, "out.weight", 1)
    with torch.no_grad():
        torch.testing.assert_close(a.gm(x), m(x), rtol=0, atol=1e-12)


def test_blocked_rule_is_recorded_on_the_node():
    from fxadapt import meta

    a = analyze(seeded(Unknown, UNKNOWN["cumprod"][0]), x4(1, 3, 4, 4))
    [node] = [n for n in a.gm.graph.nodes if n.target is torch.ops.aten.cumprod.default]
    rec = node.meta[meta.RULE]
    assert (rec.rule, rec.kind) == ("blocked", "blocks") and "cumprod" in rec.blocked
