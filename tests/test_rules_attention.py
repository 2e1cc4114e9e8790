"""Attention heads: ``heads`` mode (whole heads, grouped-query attention in whole kv groups, rotary kept
intact), ``head_dim`` mode, and ``auto`` (heads where rotary embeddings are applied); residual blocks with
side inputs; growth of heads function-preserving; tied embedding / LM head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fxadapt.passes.materialize import apply_plan
from ruletools import check_slicing, group_with, half_flops, member, seeded, x4
from torch import nn

import fxadapt
from fxadapt.planning.plan import growth_blocker, make_plan


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class GQA(nn.Module):
    """Pre-norm block: q with ``heads`` heads, k/v with ``kv`` heads, optional rotary, SDPA, MLP."""

    def __init__(self, dim=16, heads=4, kv=2, rotary=True, hd=4):
        super().__init__()
        self.h, self.kv, self.hd, self.rotary = heads, kv, hd, rotary
        self.emb = nn.Linear(6, dim)
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, heads * hd), nn.Linear(dim, kv * hd), nn.Linear(dim, kv * hd)
        self.o = nn.Linear(heads * hd, dim)
        self.up, self.down = nn.Linear(dim, 24), nn.Linear(24, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, s, _ = x.shape
        x = self.emb(x)
        y = self.n1(x)
        q = self.q(y).view(b, s, -1, self.hd).transpose(1, 2)
        k = self.k(y).view(b, s, -1, self.hd).transpose(1, 2)
        v = self.v(y).view(b, s, -1, self.hd).transpose(1, 2)
        if self.rotary:
            t = torch.arange(s, dtype=x.dtype)[:, None] * torch.arange(1, self.hd + 1, dtype=x.dtype)
            cos, sin = t.cos(), t.sin()
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        r = self.h // self.kv  # repeat_kv as Hugging Face writes it
        k = k[:, :, None].expand(b, self.kv, r, s, self.hd).reshape(b, self.h, s, self.hd)
        v = v[:, :, None].expand(b, self.kv, r, s, self.hd).reshape(b, self.h, s, self.hd)
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(att.transpose(1, 2).reshape(b, s, -1))
        x = x + self.down(F.gelu(self.up(self.n2(x))))
        return self.head(x)


def _x(batch=1):
    return x4(batch, 5, 6)


def test_gqa_rotary_auto_keeps_whole_kv_groups():
    m = seeded(GQA)
    a = fxadapt.analyze(m, (_x(),))
    g = group_with(a, "q.weight", 0)
    assert group_with(a, "k.weight", 0) is g and group_with(a, "v.weight", 0) is g
    # 2 units = 2 kv groups; a unit is 2 query heads (8 rows of q) + 1 kv head (4 rows of k, of v)
    assert (g.width, g.units, g.granularity, g.prunable) == (16, 2, 8, True)
    np.testing.assert_array_equal(member(g, "q.weight", 0).index, np.repeat([0, 1], 8))
    np.testing.assert_array_equal(member(g, "k.weight", 0).index, np.repeat([0, 1], 4))
    np.testing.assert_array_equal(member(g, "o.weight", 1).index, np.repeat([0, 1], 8))
    assert a.fired["sdpa"] == 1 and a.fired["linear"] == 8
    assert a.macs() == half_flops(m, _x())
    assert growth_blocker(a, g) is None
    hidden = group_with(a, "emb.weight", 0)  # LayerNorm statistics: dropping hidden channels is not masking
    check_slicing(a, (_x(3),), fixed={hidden.id: set(range(hidden.units))})


def test_head_dim_mode_keeps_head_count():
    m = seeded(GQA, 16, 4, 4, False)  # plain multi-head attention, no rotary
    a = fxadapt.analyze(m, (_x(),), attention="head_dim")
    qk = group_with(a, "q.weight", 0)
    assert group_with(a, "k.weight", 0) is qk and (qk.width, qk.units, qk.granularity) == (16, 4, 4)
    v = group_with(a, "v.weight", 0)
    assert v is not qk and (v.width, v.units) == (16, 4)
    assert growth_blocker(a, qk) is not None  # q.k^T contracts head_dim
    auto = fxadapt.analyze(m, (_x(),))   # auto without rotary: head_dim
    assert [g.width for g in auto.groups] == [g.width for g in a.groups]
    heads = fxadapt.analyze(m, (_x(),), attention="heads")
    h = group_with(heads, "q.weight", 0)
    assert group_with(heads, "v.weight", 0) is h and (h.units, h.granularity) == (4, 4)
    assert heads.macs() == a.macs() == half_flops(m, _x())
    hidden = group_with(heads, "emb.weight", 0)
    check_slicing(heads, (_x(3),), fixed={hidden.id: set(range(hidden.units))})
    with pytest.raises(ValueError, match="attention must be one of"):
        fxadapt.analyze(m, (_x(),), attention="rows")


def test_layer_blocks_with_side_inputs_and_growth_of_heads():
    m = seeded(GQA)
    a = fxadapt.analyze(m, (_x(),))
    assert [(b.removable, b.repeatable, len(b.body) >= 4) for b in a.blocks] == [(True, True, True)] * 2
    g = group_with(a, "q.weight", 0)
    mlp = group_with(a, "up.weight", 0)
    hidden = group_with(a, "emb.weight", 0)
    assert "normalises over these channels" in growth_blocker(a, hidden)
    plan = make_plan(a, {g.id: 4, mlp.id: 30}, repeat={a.blocks[0].id: 1})
    big = apply_plan(a.gm, plan).graph_module
    assert big.q.weight.shape == (32, 16) and big.k.weight.shape == (16, 16) \
            and big.up.weight.shape == (30, 16)
    torch.testing.assert_close(big(_x(2)), m(_x(2)), rtol=0, atol=1e-10)
    small = apply_plan(a.gm, make_plan(a, {g.id: 1}, remove={a.blocks[1].id})).graph_module
    assert small.q.weight.shape == (8, 16) and small(_x(2)).shape == (2, 5, 3)


class TiedLM(nn.Module):
    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.up, self.down = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids)
        x = x + self.down(torch.relu(self.up(x)))
        return self.lm_head(x)


def test_tied_embedding_and_lm_head_one_tensor_names_kept():
    torch.manual_seed(0)
    m = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    a = fxadapt.analyze(m, (ids,))
    assert type(a.gm.lm_head) is nn.Linear and a.gm.lm_head.weight is a.gm.wte.weight
    hidden = group_with(a, "wte.weight", 1)
    assert hidden.prunable and hidden.width == 16
    assert {(mm.target, mm.axis) for mm in hidden.members if mm.site.kind == "param"} >= {("wte.weight", 1)}
    assert hidden.producer == "wte.weight@1" and group_with(a, "wte.weight", 0).producer == "wte.weight"
    for budget in (0.5, 1.5):
        out = fxadapt.transform(m, budget, (ids,))
        assert out.lm_head.weight is out.wte.weight
        assert {"wte.weight", "lm_head.weight"} <= set(out.state_dict())
        rep = fxadapt.report(out)
        assert all(c.before in (16, 32, 50) for c in rep.groups)
        if budget > 1:
            torch.testing.assert_close(out(ids), m(ids), rtol=1e-4, atol=1e-5)
