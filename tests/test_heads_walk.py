"""How far a head split looks for its attention (``fxadapt.ops.heads.attention_split``): as far as layout and
element-wise ops go, not a fixed number of ops.

A per-head gate ``beta`` (a gated delta-net's, Qwen3-Next) is viewed ``[B, T, H*1] -> [B, T, H, 1]`` and
multiplied with the value heads only after many element-wise ops (Qwen3-Next: 12). With whole heads as
units the gate's ``H`` channels are ``H`` units coupled with the ``H`` value heads; a split that missed its
attention kept ``head_dim`` units instead (one unit spanning every head), and the product then merged all
heads into one unit. Checked against the construction (``H`` heads) and FlopCounterMode.
"""

from __future__ import annotations

import pytest
import torch
from ruletools import group_with, half_flops, seeded, x4
from torch import nn

import fxadapt
from fxadapt.ops.heads import attention_split
from fxadapt.ops.registry import op_of

D, HK, G, HD = 32, 2, 2, 8      # HK key heads, each shared by G value heads
H = HK * G


class FarGate(nn.Module):
    """Linear attention's shape (Qwen3-Next's gated delta-net, reduced): ``HK`` key heads repeated for ``G``
    value heads each, and a per-value-head gate viewed ``[B, T, HK, G]`` (key head, value head within it)
    that scales the values ``depth`` sigmoids after its view."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth
        self.q, self.k = nn.Linear(D, HK * HD), nn.Linear(D, HK * HD)
        self.v, self.b, self.out = nn.Linear(D, H * HD), nn.Linear(D, H), nn.Linear(H * HD, D)

    def forward(self, x):
        B, T, _ = x.shape
        q, k = (p(x).view(B, T, HK, HD).repeat_interleave(G, 2).transpose(1, 2) for p in (self.q, self.k))
        v = self.v(x).view(B, T, H, HD).transpose(1, 2)
        beta = self.b(x).view(B, T, HK, G)
        for _ in range(self.depth):
            beta = torch.sigmoid(beta)
        beta = beta.reshape(B, T, H).transpose(1, 2).unsqueeze(-1)
        o = (q @ k.transpose(-1, -2)).softmax(-1) @ (v * beta)
        return self.out(o.transpose(1, 2).reshape(B, T, H * HD))


@pytest.mark.parametrize("depth", [1, 30])
def test_a_far_gate_keeps_whole_key_heads(depth):
    m, x = seeded(FarGate, depth), x4(1, 5, D)
    a = fxadapt.analyze(m, (x,), attention="heads")
    g = group_with(a, "q.weight", 0)
    assert g.prunable and g.units == HK                                # one unit per key head, as built
    assert group_with(a, "v.weight", 0) is g and group_with(a, "b.weight", 0) is g
    assert a.macs() == half_flops(m, x)


def test_a_split_read_by_a_linear_reaches_no_attention():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(HD, D)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x).view(1, 5, H, HD))).sum(2)

    gm = fxadapt.capture(seeded(Split), (x4(1, 5, D),), dynamic="static")
    views = [n for n in gm.graph.nodes if op_of(n) == torch.ops.aten.view.default]
    assert views and not any(attention_split(n)[0] for n in views)
