"""Head folds (``fxadapt.ops.heads``) and weight-standardised convolutions (``fxadapt.ops.wstd``).

A gated delta-net (Qwen3.5, OLMo-hybrid) ends with a gated RMSNorm over ``head_dim``: the attention output
``o[B, T, H, D]`` and the gate ``z`` are folded to ``[B*T*H, D]``, normalised and multiplied per row, and
unfolded. With whole heads as units both operands must carry the heads on the rows. BiT convolves with
``batch_norm(W.reshape(1, O, -1), training=True).reshape_as(W)``: each output channel standardised alone.
Checked against hand-built references (weights sliced by hand), the masked original and FlopCounterMode.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from ruletools import analyze, check_slicing, group_with, half_flops, n_params, param_members, seeded, x4
from torch import nn

import fxadapt
from fxadapt.ops.heads import folds_heads

D, H, HD = 32, 4, 8


class GatedNorm(nn.Module):
    """``w * norm(x) * silu(z)`` over the last axis (Qwen3.5's ``RMSNormGated``)."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x, z):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x * F.silu(z)


class GatedHeads(nn.Module):
    """Per-head causal linear attention, then a gated norm with the heads folded into the rows. ``split``:
    the gate is viewed ``[B, T, H, D]`` before its fold (Qwen3.5); else folded straight from ``[B, T, H*D]``
    (OLMo-hybrid)."""

    def __init__(self, split: bool = True, heads: int = H):
        super().__init__()
        self.split, self.h = split, heads
        self.q, self.k, self.v, self.z = (nn.Linear(D, heads * HD, bias=False) for _ in range(4))
        self.norm, self.out = GatedNorm(HD), nn.Linear(heads * HD, D, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, -1, HD).transpose(1, 2) for p in (self.q, self.k, self.v))
        o = ((q @ k.transpose(-1, -2)).tril() @ v).transpose(1, 2)
        z = self.z(x).reshape(b, t, -1, HD) if self.split else self.z(x)
        o = self.norm(o.reshape(-1, HD), z.reshape(-1, HD)).reshape(b, t, -1)
        return self.out(o)


def _by_heads(m: GatedHeads, keep: list[int]) -> GatedHeads:
    """The reference: a model with only the heads ``keep``, its weights sliced by hand."""
    rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in keep])
    ref = GatedHeads(m.split, len(keep)).to(torch.float64).eval()
    with torch.no_grad():
        for name in "qkvz":
            getattr(ref, name).weight.copy_(getattr(m, name).weight[rows])
        ref.out.weight.copy_(m.out.weight[:, rows])
        ref.norm.weight.copy_(m.norm.weight)
    return ref


@pytest.mark.parametrize("split", [True, False])
def test_head_fold_keeps_whole_heads_on_both_operands(split):
    m, x = seeded(GatedHeads, split), x4(1, 5, D)
    a = fxadapt.analyze(m, (x,), attention="heads")
    g = group_with(a, "q.weight", 0)
    assert g.prunable and (g.units, g.granularity) == (H, HD)          # whole heads
    assert param_members(g) >= {("z.weight", 0, "out"), ("v.weight", 0, "out"), ("out.weight", 1, "in")}
    folds = [n.name for n in a.gm.graph.nodes if folds_heads(n)]
    assert len(folds) == 2                                             # o's fold and z's
    assert a.fired["view"] == 7 - (not split)          # 3 splits, z's split, 2 folds, 1 unfold
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 5, D),))                                   # == the original with heads zeroed
    keep = [0, 2, 3]
    sliced = __import__("refslicer").slice_module(a, {g.id: set(keep)})
    torch.testing.assert_close(sliced(x), _by_heads(m, keep)(x), rtol=0, atol=1e-12)


def test_head_fold_under_head_dim_mode_keeps_head_dim_on_both_operands():
    m, x = seeded(GatedHeads), x4(1, 5, D)
    a = fxadapt.analyze(m, (x,), attention="head_dim")
    g = group_with(a, "v.weight", 0)
    assert g.prunable and (g.units, g.granularity) == (HD, H)          # a unit: one position in every head
    assert group_with(a, "z.weight", 0) is g
    assert a.macs() == half_flops(m, x)


def test_head_fold_transform_removes_heads():
    m, x = seeded(GatedHeads, False), x4(1, 5, D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxadapt.transform(m, 0.5, x, attention="heads")
    assert type(out) is GatedHeads and out.q.weight.shape[0] % HD == 0
    rows = out.q.weight.reshape(-1, HD, D)
    kept = [h for h in range(H) if any(torch.equal(r, m.q.weight[h * HD:(h + 1) * HD]) for r in rows)]
    assert len(kept) == len(rows) < H
    torch.testing.assert_close(out(x), _by_heads(m, kept)(x), rtol=0, atol=1e-12)


# --- weight standardisation ---------------------------------------------------------------------------
def _standardise(w: torch.Tensor, gain: torch.Tensor | None = None) -> torch.Tensor:
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, gain, training=True, momentum=0.0,
                        eps=1e-6).reshape_as(w)


class StdConv(nn.Conv2d):
    """BiT's ``WeightStandardizedConv2d`` (``gain``: timm's ``ScaledStdConv2d``, a per-channel gain)."""

    def __init__(self, *args, gain: bool = False, **kw):
        super().__init__(*args, **kw)
        self.gain = nn.Parameter(torch.rand(self.out_channels) + 0.5) if gain else None

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, self.gain, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSNet(nn.Module):
    def __init__(self, gain: bool = False):
        super().__init__()
        self.c1 = StdConv(3, 16, 3, padding=1, bias=False, gain=gain)
        self.dw = StdConv(16, 16, 3, padding=1, groups=16, bias=False)
        self.c2 = StdConv(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.c1(x))))
        return self.head(torch.relu(self.c2(x)).mean((2, 3)))


def _ws_reference(m: WSNet, x, k1: list[int], k2: list[int]):
    """The network with channels ``k1`` of c1 (and dw) and ``k2`` of c2, its weights sliced by hand."""
    c1, dw = m.c1.weight[k1], m.dw.weight[k1]
    g1 = m.c1.gain[k1] if m.c1.gain is not None else None
    c2 = m.c2.weight[k2][:, k1]
    y = torch.relu(F.conv2d(x, _standardise(c1, g1), None, padding=1))
    y = torch.relu(F.conv2d(y, _standardise(dw), None, padding=1, groups=len(k1)))
    y = torch.relu(F.conv2d(y, _standardise(c2), m.c2.bias[k2], padding=1)).mean((2, 3))
    return F.linear(y, m.head.weight[:, k2], m.head.bias)


@pytest.mark.parametrize("gain", [False, True])
def test_weight_standardised_conv_slices_like_its_parameter(gain):
    import refslicer

    m, x = seeded(WSNet, gain), x4(1, 3, 8, 8)
    a = analyze(m, x)
    g1, g2 = group_with(a, "c1.weight", 0), group_with(a, "c2.weight", 0)
    assert g1.prunable and g1.units == 16 and g2.prunable and g2.units == 8
    assert group_with(a, "dw.weight", 0) is g1 and group_with(a, "c2.weight", 1) is g1
    shapes = sorted((m.site.node_name, m.site.index) for g in (g1, g2) for m in g.members
                    if m.site.kind == "shape_arg")
    assert shapes == [("reshape", 1), ("reshape_1", 1), ("reshape_2", 1)]     # reshape(1, O, -1)
    mixes = [m.site.node_name for m in g1.members if m.site.kind == "mix"]
    assert mixes == ["batch_norm_2"]          # c2's statistics run over g1; the depthwise filter's do not
    assert (("c1.gain", 0, "norm") in param_members(g1)) == gain
    assert a.fired["conv"] == 3 and a.fired["batch_norm"] == 3
    assert a.macs() == half_flops(m, x) and a.params() == n_params(m)
    for k1, k2 in (([1, 4, 5, 9, 15], [0, 3, 7]), (list(range(16)), [2, 6])):
        sliced = refslicer.slice_module(a, {g1.id: set(k1), g2.id: set(k2)})
        torch.testing.assert_close(sliced(x), _ws_reference(m, x, k1, k2), rtol=0, atol=1e-12)
    check_slicing(a, (x4(2, 3, 8, 8),), fixed={g1.id: set(range(16))})   # c2's outputs: == zeroing them


def test_weight_standardised_transform_shrinks_and_grows_its_outputs():
    m, x = seeded(WSNet), x4(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, big = fxadapt.transform(m, 0.5, x), fxadapt.transform(m, 1.5, x)
    assert type(small) is WSNet and small.c1.weight.shape[0] < 16
    k1 = [next(i for i in range(16) if torch.equal(r, m.c1.weight[i])) for r in small.c1.weight]
    k2 = [next(i for i in range(8) if torch.equal(r[0], m.c2.weight[i, k1[0]])) for r in small.c2.weight]
    torch.testing.assert_close(small(x), _ws_reference(m, x, k1, k2), rtol=0, atol=1e-12)
    # growth: c2's new output channels start at zero (a zero filter standardises to zero); c1's channels
    # feed c2's statistics and keep their width
    assert big.c1.weight.shape[0] == 16 and big.c2.weight.shape[0] > 8
    torch.testing.assert_close(big(x), m(x), rtol=1e-9, atol=1e-9)


class FlippedWeight(nn.Module):
    """Every convolution reads a weight computed by an op that is not per output channel."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(4, 8, 3, 3))

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.w1.flip(0)), self.w2.flip(0)).mean((2, 3))


def test_computed_weight_refusal_names_the_op():
    m, x = seeded(FlippedWeight), x4(1, 3, 8, 8)
    a = analyze(m, x)
    reasons = [g.reason for g in a.groups if not g.prunable]
    assert any("flip" in r and "not a per-output-channel op" in r for r in reasons), reasons
    with pytest.raises(fxadapt.BudgetError, match=r"computed at run time \(flip"):
        fxadapt.transform(m, 0.5, x)


class LoopedExperts(nn.Module):
    """DBRX / Switch Transformers' expert loop: only the experts some token is routed to run."""

    def __init__(self):
        super().__init__()
        self.router, self.experts = nn.Linear(8, 4), nn.ModuleList(nn.Linear(8, 8) for _ in range(4))

    def forward(self, x):
        top = self.router(x).argmax(-1)
        mask = F.one_hot(top, 4).permute(1, 0)
        out = torch.zeros_like(x)
        for e in (mask.sum(-1) > 0).nonzero():
            tokens = torch.where(mask[e[0]])[0]
            out = out.index_add(0, tokens, self.experts[0](x[tokens]))
        return out


def test_expert_loop_capture_error_says_what_the_model_does():
    with pytest.raises(fxadapt.CaptureError) as info:
        fxadapt.capture(LoopedExperts().eval(), (torch.randn(6, 8),))
    msg = str(info.value)
    assert "\n" not in msg and "LoopedExperts.forward loops over the values of a tensor" in msg
    assert "range(num_experts)" in msg and "Eq(u0" not in msg


# --- the Hugging Face families at tiny size -------------------------------------------------------------
def test_bit_convolutions_are_prunable():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BitConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_groups=8,
                                 num_labels=10, out_features=None)
    torch.manual_seed(0)
    model = transformers.BitForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = fxadapt.analyze(model, (x,))
    assert not [g for g in a.groups if g.reason and "computed at run time" in g.reason]
    stem = group_with(a, "bit.embedder.convolution.weight", 0)
    assert stem.prunable and stem.granularity == 8                     # GroupNorm(8) groups
    assert a.macs() == pytest.approx(half_flops(model, x), rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["Qwen3_5", "OlmoHybrid"])
def test_gated_delta_net_heads_are_prunable(family):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
              linear_num_key_heads=2, linear_num_value_heads=4, pad_token_id=0, bos_token_id=1,
              eos_token_id=2,
              layer_types=["linear_attention", "full_attention"])
    cfg = getattr(transformers, f"{family}TextConfig" if family == "Qwen3_5" else f"{family}Config")(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    a = fxadapt.analyze(model, {"input_ids": ids, "use_cache": False}, attention="heads")
    mixer = [g for g in a.groups if ".linear_attn." in g.name]
    assert mixer and all(g.prunable for g in mixer), mixer
    assert a.uncosted == ()
