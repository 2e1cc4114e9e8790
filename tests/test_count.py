"""``count_macs`` (the independent check) counts attention exactly: fused CPU SDPA, the
``nn.TransformerEncoderLayer`` fast path, and HF BERT/ViT built from small configs, against hand counts
(an SDPA call over b x h heads, L queries, S keys, head dims E, Ev: b*h*L*S*(E + Ev) MACs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fxadapt.analysis.count import count_macs, countable_attention
from fxadapt.ir.inputs import Inputs


class SDPA(nn.Module):
    """Projections around one ``F.scaled_dot_product_attention`` call (causal, optional GQA)."""

    def __init__(self, dim=32, heads=4, kv_heads=4, dv=8):
        super().__init__()
        self.heads, self.kv_heads, self.hd, self.dv = heads, kv_heads, dim // heads, dv
        self.q = nn.Linear(dim, heads * self.hd)
        self.k = nn.Linear(dim, kv_heads * self.hd)
        self.v = nn.Linear(dim, kv_heads * dv)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv_heads, self.dv).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.heads != self.kv_heads)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sdpa_counts_both_matmuls(kv_heads):
    b, n, dim, h, hd, dv = 2, 6, 32, 4, 8, 8
    model = SDPA(dim, h, kv_heads, dv).eval()
    linears = b * n * dim * (h * hd + kv_heads * hd + kv_heads * dv)
    attention = b * h * n * n * (hd + dv)
    assert count_macs(model, (torch.randn(b, n, dim),)) == linears + attention


def test_sdpa_with_float_mask_and_different_lengths():
    class Cross(nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    b, h, L, S, E, Ev = 2, 3, 5, 7, 8, 4
    args = (torch.randn(b, h, L, E), torch.randn(b, h, S, E), torch.randn(b, h, S, Ev),
            torch.zeros(b, 1, L, S))
    assert count_macs(Cross(), args) == b * h * L * S * (E + Ev)


def test_transformer_encoder_layer_fast_path_is_counted_and_setting_restored():
    b, n, d, h, ff = 2, 6, 32, 4, 64
    layer = nn.TransformerEncoderLayer(d, h, ff, batch_first=True).eval()
    before = torch.backends.mha.get_fastpath_enabled()
    macs = count_macs(layer, torch.randn(b, n, d))
    assert macs == b * n * d * 3 * d + 2 * b * n * n * d + b * n * d * d + 2 * b * n * d * ff
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert layer.training is False


def test_settings_restored_after_an_error():
    before = torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(RuntimeError):
        count_macs(nn.Linear(4, 2), torch.randn(1, 5))
    assert torch.backends.mha.get_fastpath_enabled() == before
    with countable_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_keyword_inputs_and_inputs_objects():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(5, 3)

        def forward(self, x, *, extra):
            return self.a(x) + self.b(extra)

    x, e = torch.randn(2, 4), torch.randn(2, 5)
    expected = 2 * 4 * 3 + 2 * 5 * 3
    assert count_macs(KW(), {"x": x, "extra": e}) == expected
    assert count_macs(KW(), ((x,), {"extra": e})) == expected
    assert count_macs(KW(), Inputs((x,), {"extra": e})) == expected


def _encoder_macs(b, n, hidden, inter, layers):
    return layers * (4 * b * n * hidden * hidden + 2 * b * n * n * hidden + 2 * b * n * hidden * inter)


def test_hf_bert_counts_attention():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=1000)
    model = transformers.BertModel(cfg).eval()
    assert model.config._attn_implementation == "sdpa"
    b, n = 2, 9
    ids = torch.randint(0, 1000, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, -3:] = 0
    expected = _encoder_macs(b, n, 64, 128, 2) + b * 64 * 64  # + pooler on the first token
    assert count_macs(model, {"input_ids": ids, "attention_mask": mask}) == expected


def test_hf_vit_counts_attention():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8)
    model = transformers.ViTModel(cfg).eval()
    b, patches = 2, (32 // 8) ** 2
    n = patches + 1  # + CLS token
    embed = b * 64 * patches * 3 * 8 * 8
    expected = embed + _encoder_macs(b, n, 64, 128, 2) + b * 64 * 64
    assert count_macs(model, torch.randn(b, 3, 32, 32)) == expected
