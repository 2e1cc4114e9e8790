"""Zero states and thrown-away outer products (``fxadapt.ops.operands.zero_axis_labels``, the matmul rule in
``fxadapt.ops.indexing``): what a gated delta-net (Qwen3-Next, Qwen3.5, OLMo-hybrid) is made of.

A chunked delta-rule scan starts from ``S = zeros(B, d_k, d_v)``, reads it with ``k @ S`` / ``q @ S`` and
adds ``k^T @ v`` to it. Zeros stay zeros at any size, so the factory's ``d_k`` and ``d_v`` entries follow
the key and value channels; the final state a one-chunk scan throws away cannot pin either width. Checked
against the original (masked slicing, function-preserving growth) and FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from ruletools import analyze, check_slicing, group_with, half_flops, param_members, seeded, x4
from torch import nn

import fxadapt

DK, DV, D = 16, 24, 32


class DeltaScan(nn.Module):
    """One chunk of a delta-rule scan from a zero state; ``chunks=2`` carries the state into a second one."""

    def __init__(self, chunks: int = 1):
        super().__init__()
        self.chunks = chunks
        self.q, self.k = nn.Linear(D, DK, bias=False), nn.Linear(D, DK, bias=False)
        self.v = nn.Linear(D, DV, bias=False)
        self.out = nn.Linear(DV, D, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        state = x.new_zeros(x.shape[0], k.shape[-1], v.shape[-1])
        outs = []
        for c in range(self.chunks):
            qc, kc, vc = (t[:, c * 4:(c + 1) * 4] for t in (q, k, v))
            v_new = vc - kc @ state                      # contracted with the zero state, then combined
            outs.append(qc @ state + (qc @ kc.transpose(-1, -2)).tril() @ v_new)
            state = state * 0.5 + kc.transpose(-1, -2) @ v_new   # d_k x d_v: an outer product
        return self.out(torch.cat(outs, dim=1))


def _zero_sites(a) -> list[tuple[int, int]]:
    """``(size entry, group id)`` of every site on the zero state's factory."""
    zeros = [n.name for n in a.gm.graph.nodes if n.target == torch.ops.aten.new_zeros.default]
    return sorted((m.site.index, g.id) for g in a.groups for m in g.members
                  if m.site.kind == "shape_arg" and m.site.node_name in zeros)


def test_zero_state_follows_key_and_value_channels():
    m, x = seeded(DeltaScan), x4(1, 4, D)
    a = analyze(m, x)
    dk, dv = group_with(a, "k.weight", 0), group_with(a, "v.weight", 0)
    assert dk.prunable and dk.units == DK and dv.prunable and dv.units == DV
    assert _zero_sites(a) == [(1, dk.id), (2, dv.id)]   # one site per factory entry: d_k and d_v
    assert a.fired["matmul"] == 5
    assert a.macs() == half_flops(m, x)
    x2 = (x4(2, 4, D),)
    check_slicing(a, x2, fixed={dk.id: set(range(DK))})   # value channels: exact against the masked original
    check_slicing(a, x2, exact=False)                     # dropping key channels changes q . k


def test_carried_state_keeps_the_larger_space():
    """A state read by the next chunk is a live d_k x d_v outer product: one tensor carries one space, so
    the larger (d_v) follows and d_k keeps its width, with a reason that names the op."""
    m, x = seeded(DeltaScan, 2), x4(1, 8, D)
    a = analyze(m, x)
    dk, dv = group_with(a, "k.weight", 0), group_with(a, "v.weight", 0)
    assert dv.prunable and not dk.prunable
    assert "outer product of two channel spaces" in dk.reason and "matmul" in dk.reason
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 8, D),))


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_zero_state_transform_shrinks_and_grows(budget):
    m, x = seeded(DeltaScan), x4(2, 4, D)
    out = fxadapt.transform(m, budget, (x,))
    assert type(out) is DeltaScan
    assert out.k.weight.shape != m.k.weight.shape or out.v.weight.shape != m.v.weight.shape
    ratio = half_flops(out, x[:1]) / half_flops(m, x[:1])
    assert abs(ratio - budget) <= 0.05 * budget
    if budget > 1:
        torch.testing.assert_close(out(x), m(x), rtol=1e-6, atol=1e-8)  # growth preserves the function


class CausalChunk(nn.Module):
    """``tril`` of a score matrix (channels on neither of its two axes) and of a tensor with channels."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 5)
        self.out = nn.Linear(8, 5)

    def forward(self, x):                           # x: [B, T, 6]
        h = self.a(x)
        scores = (h @ h.transpose(-1, -2)).tril()   # [B, T, T]: passes
        return self.out(scores @ h) + self.b(x).tril()   # b's channels on the last axis: a triangle of them


def test_tril_passes_other_axes_and_freezes_a_triangle_of_channels():
    m, x = seeded(CausalChunk), x4(1, 5, 6)
    a = analyze(m, x)
    assert a.fired["triangle"] == 2
    assert group_with(a, "a.weight", 0).prunable
    frozen = group_with(a, "b.weight", 0)
    assert not frozen.prunable and "tril keeps a triangle of the channel axes" in frozen.reason
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 5, 6),), exact=False)


class FoldedGate(nn.Module):
    """``u(x)[T, 3] * w(x^T)^T[T, 3]``: an outer product where both tensors span both axes at full size
    (``w``'s channels on axis 0, the rows; ``u``'s on axis 1), so neither can follow (heads folded into rows
    met by a gate with its own rows: Qwen3.5's gated norm)."""

    def __init__(self):
        super().__init__()
        self.u, self.w = nn.Linear(3, 3), nn.Linear(6, 6)
        self.out = nn.Linear(3, 2)

    def forward(self, x):                           # x: [B, 6, 3]
        return self.out(self.u(x) * self.w(x.transpose(1, 2)).transpose(1, 2))


def test_outer_product_over_full_axes_freezes_both_spaces():
    m, x = seeded(FoldedGate), x4(1, 6, 3)
    a = analyze(m, x)
    w = group_with(a, "w.weight", 0)
    assert not w.prunable and "whose channels lie on other axes" in w.reason
    assert not group_with(a, "u.weight", 0).prunable
    assert a.macs() == half_flops(m, x)


@pytest.mark.slow
def test_qwen3_next_gated_delta_net_is_prunable():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3NextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=64,
        layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    a = fxadapt.analyze(model, {"input_ids": ids, "use_cache": False})
    mixer = [g for g in a.groups if "linear_attn.in_proj_qkvz" in g.name]
    assert sorted(g.width for g in mixer) == [64, 128] and all(g.prunable for g in mixer)   # d_k and d_v
    zeros = [n.name for n in a.gm.graph.nodes if n.target == torch.ops.aten.zeros.default]
    entries = {m.site.index for g in mixer for m in g.members
               if m.site.kind == "shape_arg" and m.site.node_name in zeros}
    assert entries == {2, 3}        # the recurrent state [B, H, d_k, d_v] follows both
    assert a.uncosted == ()


class ComplexRotary(nn.Module):
    """Attention with rotary embeddings as a complex product (Llama 4): ``view_as_complex`` of head_dim
    pairs times ``exp(i * theta)``, ``view_as_real`` back; whole heads are the units."""

    def __init__(self, heads: int = 4, dim: int = 8):
        super().__init__()
        self.h, self.d = heads, dim
        self.q, self.k, self.v = (nn.Linear(16, heads * dim) for _ in range(3))
        self.o = nn.Linear(heads * dim, 16)
        theta = torch.arange(6)[:, None] * 0.1 * torch.arange(1, dim // 2 + 1)[None, :]
        self.register_buffer("cos", theta.cos())
        self.register_buffer("sin", theta.sin())

    def _rot(self, x):
        b, t, _ = x.shape
        z = torch.view_as_complex(x.view(b, t, self.h, self.d).float().reshape(b, t, self.h, -1, 2))
        turn = torch.complex(self.cos[:t], self.sin[:t])[:, None, :]
        return torch.view_as_real(z * turn).flatten(3).type_as(x).transpose(1, 2)

    def forward(self, x):                            # x: [B, 6, 16]
        b, t, _ = x.shape
        q, k = self._rot(self.q(x)), self._rot(self.k(x))
        v = self.v(x).view(b, t, self.h, self.d).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_complex_rotary_keeps_whole_heads():
    m, x = seeded(ComplexRotary), x4(1, 6, 16)
    a = analyze(m, x)
    assert a.fired["view_as_complex"] == 2 and a.fired["view_as_real"] == 2
    heads = group_with(a, "q.weight", 0)
    assert heads.prunable and heads.granularity == 8 and heads is group_with(a, "k.weight", 0)
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 6, 16),))


class BatchedExperts(nn.Module):
    """Experts as ``bmm`` with 3-D parameters ``[E, H, 2I]`` / ``[E, I, H]`` (Llama 4's text experts)."""

    def __init__(self, experts: int = 3, hidden: int = 8, inter: int = 6):
        super().__init__()
        self.e, self.hid = experts, hidden
        self.inp, self.out = nn.Linear(5, hidden), nn.Linear(hidden, 5)
        self.gate_up = nn.Parameter(torch.randn(experts, hidden, 2 * inter) * 0.3)
        self.down = nn.Parameter(torch.randn(experts, inter, hidden) * 0.3)

    def forward(self, x):                            # x: [B, T, 5]
        h = self.inp(x)
        hs = h.reshape(-1, self.hid).repeat(self.e, 1).view(self.e, -1, self.hid)
        g, u = torch.bmm(hs, self.gate_up).chunk(2, dim=-1)
        y = torch.bmm(torch.nn.functional.silu(g) * u, self.down).sum(0)
        return self.out(h + y.view(h.shape))


def test_bmm_with_a_batched_weight_slices_its_last_two_axes():
    m, x = seeded(BatchedExperts), x4(1, 4, 5)
    a = analyze(m, x)
    inter = group_with(a, "down", 1)
    assert inter.prunable and {("gate_up", 2, "out"), ("down", 1, "in")} <= param_members(inter)
    hidden = group_with(a, "inp.weight", 0)
    assert hidden.prunable and {("gate_up", 1, "in"), ("down", 2, "out")} <= param_members(hidden)
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 4, 5),))
