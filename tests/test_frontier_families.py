"""Issue 27: rules for this year's families (grouped heads, interleaved gate/up, attention sinks, per-expert
biases, latent attention) on toy models, and DeepSeek-V3 / GPT-OSS / Bamba (a Mamba-2 hybrid) adapted at 0.5
and generating, built from the sweep's small configs (``bench/hf_families.py``)."""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from ruletools import analyze, check_slicing, group_with, half_flops, param_members, seeded, x4
from torch import nn

import fxadapt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


class GroupedHeads(nn.Module):
    """``B.repeat_interleave(H // G, dim=2)`` (Mamba-2's grouped B/C): channels on the last axis pass through;
    repeating the channel axis itself repeats every label."""

    def __init__(self, output_size=None):
        super().__init__()
        self.b, self.x, self.out, self.out_b = nn.Linear(6, 2 * 4), nn.Linear(6, 8), nn.Linear(8, 3), \
                nn.Linear(4, 3)
        self.output_size = output_size

    def forward(self, x):
        b = self.b(x).view(x.shape[0], x.shape[1], 2, 4).repeat_interleave(3, dim=2)  # [B, L, 6, n]
        y = self.x(x).repeat_interleave(2, dim=-1, output_size=self.output_size)       # [B, L, 16]
        return self.out(y[..., ::2]) + self.out_b(b.sum(2))


def test_repeat_interleave_passes_and_repeats_channels():
    m, x = seeded(GroupedHeads), x4(1, 5, 6)
    a = analyze(m, x)
    assert a.fired["repeat_interleave"] == 2
    g = group_with(a, "x.weight", 0)
    assert g.prunable and ("out.weight", 1, "in") in param_members(g)
    assert group_with(a, "b.weight", 0).prunable
    assert a.macs() == half_flops(m, x)
    check_slicing(a, (x4(2, 5, 6),))


def test_repeat_interleave_output_size_is_dropped_on_rewrite():
    m, x = seeded(GroupedHeads, 16), x4(2, 5, 6)
    small = fxadapt.transform(m, 0.5, (x,), output="graph")
    assert small(x).shape == m(x).shape
    assert any(n.target == torch.ops.aten.repeat_interleave.self_int and not n.kwargs.get("output_size")
               for n in small.graph.nodes)


class Interleaved(nn.Module):
    """gpt-oss's fused ``gate_up`` with gate and up interleaved: ``[..., ::2]`` and ``[..., 1::2]``."""

    def __init__(self):
        super().__init__()
        self.gate_up, self.down = nn.Linear(6, 16), nn.Linear(8, 6)

    def forward(self, x):
        h = self.gate_up(x)
        return self.down(torch.sigmoid(h[..., ::2]) * (h[..., 1::2] + 1))


def test_strided_slice_of_interleaved_channels():
    m, x = seeded(Interleaved), x4(1, 5, 6)
    a = analyze(m, x)
    g = group_with(a, "gate_up.weight", 0)
    assert g.prunable and g.units == 8 and g.granularity == 2   # a unit: gate j and up j together
    check_slicing(a, (x4(2, 5, 6),))


class Sinks(nn.Module):
    """Attention sinks: one learned logit per head concatenated to the scores (gpt-oss)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(8, 3 * 8), nn.Linear(8, 8)
        self.sinks = nn.Parameter(torch.randn(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 2).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2)
        s = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, -1)], dim=-1).softmax(-1)[..., :-1]
        return self.o((s @ v).transpose(1, 2).reshape(b, n, 8))


def test_attention_sinks_follow_the_heads():
    m, x = seeded(Sinks), x4(1, 5, 8)
    a = fxadapt.analyze(m, (x,), attention="heads")
    g = group_with(a, "sinks", 0)
    assert g.prunable and ("sinks", 0, "const") in param_members(g)
    assert a.macs() == half_flops(m, x)


def _family(name):
    from hf_families import FAMILIES

    fam = FAMILIES[name]
    return fam, fam.build(), fam.example()


def _adapt_and_generate(name):
    fam, model, x = _family(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxadapt.transform(model, 0.5, x)
    assert type(small) is type(model)
    rep = fxadapt.report(small)
    assert rep is not None
    out = small.generate(**fam.gen(), max_new_tokens=3, do_sample=False)
    assert out.shape[-1] == fam.gen()["input_ids"].shape[-1] + 3
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():   # save_pretrained round trip
        warnings.simplefilter("ignore")
        small.save_pretrained(d)
        again = fxadapt.from_pretrained(d)
        with torch.no_grad():
            torch.testing.assert_close(again(**x).logits, small(**x).logits)
    return model, small


def test_deepseek_v3_latent_attention_adapts_and_generates():
    model, small = _adapt_and_generate("deepseek_v3")
    attn, old = small.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert attn.kv_a_proj_with_mqa.out_features == attn.kv_lora_rank + attn.qk_rope_head_dim
    assert attn.kv_a_layernorm.weight.shape[0] == attn.kv_lora_rank
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert old.kv_lora_rank == 32


def test_gpt_oss_experts_heads_and_sinks_adapt_and_generate():
    model, small = _adapt_and_generate("gpt_oss")
    new, old = small.model.layers[0], model.model.layers[0]
    assert new.mlp.experts.gate_up_proj.shape != old.mlp.experts.gate_up_proj.shape
    assert new.self_attn.sinks.shape[0] == new.self_attn.q_proj.out_features // new.self_attn.head_dim


def test_bamba_mamba2_mixer_shrinks_and_generates():
    model, small = _adapt_and_generate("bamba")
    new, old = small.model.layers[0].mamba, model.model.layers[0].mamba
    assert new.intermediate_size < old.intermediate_size
    assert new.conv_dim == new.intermediate_size + 2 * new.n_groups * new.ssm_state_size
    assert new.norm.group_size == new.intermediate_size // new.n_groups


@pytest.mark.parametrize("name", ["gpt_oss", "bamba"])
def test_frontier_analysis_has_prunable_mixers(name):
    fam, model, x = _family(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = fxadapt.analyze(model, x)
    names = {g.name for g in a.prunable}
    want = {"gpt_oss": ("experts", "self_attn"), "bamba": ("mamba.in_proj",)}[name]
    assert all(any(w in n for n in names) for w in want), names
    assert a.uncosted == ()


def test_deepseek_v3_grouped_kv_heads_capture_error_names_the_config():
    """MLA with num_key_value_heads < num_attention_heads: eager fails too once a mask is materialised (a
    padded attention_mask); capture says what the model does and what to change, in one line."""
    import transformers
    from hf_families import FAMILIES, tokens

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(**{**FAMILIES["deepseek_v3"].overrides, "num_key_value_heads": 2})
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    x = tokens()
    padded = {**x, "attention_mask": x["attention_mask"].clone()}
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(RuntimeError):
        model(**padded)
    with pytest.raises(fxadapt.CaptureError, match="set num_key_value_heads = num_attention_heads") as e:
        fxadapt.capture(model, x)
    assert "\n" not in str(e.value)
