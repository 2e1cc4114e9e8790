"""Transformers benchmark: Hugging Face models from small configs (no download) and a hand-written SDPA model
with tied weights, at budgets 0.25 / 0.5 / 1.5: pass, budget error by the independent count
(``fxadapt.analysis.count.count_macs``), transform time, which dimensions moved.

    python bench/bench_transformers.py [--budgets 0.25 0.5 1.5] [--models gpt2 llama]

Prints a markdown table and writes ``bench/.cache/bench_transformers.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs

VOCAB, SEQ = 1000, 8
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _tokens():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, VOCAB, (1, SEQ), generator=g),
            "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}


class TiedSDPA(nn.Module):
    """Hand-written pre-norm decoder with F.scaled_dot_product_attention and embedding = LM head."""

    def __init__(self, vocab=VOCAB, dim=64, heads=4, layers=2):
        super().__init__()
        self.wte, self.h = nn.Embedding(vocab, dim), heads
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(n1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim),
                                                       o=nn.Linear(dim, dim), n2=nn.LayerNorm(dim),
                                                       up=nn.Linear(dim, 4 * dim),
                                                       down=nn.Linear(4 * dim, dim)))
                                    for _ in range(layers))
        self.norm, self.lm_head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        x = self.wte(ids)
        b, s, d = x.shape
        for blk in self.blocks:
            q, k, v = blk.qkv(blk.n1(x)).split(d, -1)
            q, k, v = (t.view(b, s, self.h, -1).transpose(1, 2) for t in (q, k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk.o(a.transpose(1, 2).reshape(b, s, d))
            x = x + blk.down(F.gelu(blk.up(blk.n2(x))))
        return self.lm_head(self.norm(x))


def _models():
    import transformers as T

    T.logging.set_verbosity_error()
    tok = _tokens
    img = lambda: (torch.randn(1, 3, 32, 32),)  # noqa: E731
    audio = lambda: (torch.randn(1, 1600),)  # noqa: E731
    return {
        "bert": (lambda: T.BertModel(T.BertConfig(vocab_size=VOCAB, **SMALL)), tok),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                                        n_positions=64)), tok),
        "llama-gqa": (lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2,
                                                               **SMALL)), tok),
        "qwen2-gqa": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2,
                                                               **SMALL)), tok),
        "vit": (lambda: T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **SMALL)), img),
        "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[1, 1],
                                                  num_heads=[2, 4], window_size=4)), img),
        "whisper": (lambda: T.WhisperModel(T.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1,
                                                           decoder_layers=1, encoder_attention_heads=4,
                                                           decoder_attention_heads=4, encoder_ffn_dim=128,
                                                           decoder_ffn_dim=128, num_mel_bins=16,
                                                           max_source_positions=16, max_target_positions=16,
                                                           pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                           decoder_start_token_id=1)),
                    lambda: {"input_features": torch.randn(1, 16, 32),
                             "decoder_input_ids": torch.randint(0, VOCAB, (1, 4))}),
        "wav2vec2": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(conv_dim=(32, 32), conv_stride=(5, 4),
                                                              conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                                              num_conv_pos_embedding_groups=4, **SMALL)),
                                                              audio),
        "tied-sdpa": (TiedSDPA, lambda: (torch.randint(0, VOCAB, (1, SEQ)),)),
    }


def _moved(rep, a) -> str:
    """Which dimensions moved: attention (heads or head_dim, by the analysis' mode), mlp, hidden (embedding /
    residual stream), layers (blocks removed / added); by group names (``a`` unused)."""
    kinds = set()
    for c in rep.groups:
        if c.before == c.after:
            continue
        name = c.name.lower()
        if any(k in name for k in ("attn", "attention", "query", "q_proj", "qkv", "self")):
            kinds.add("attention")
        elif any(k in name for k in ("embed", "wte", "patch", "conv", "feature_projection")):
            kinds.add("hidden")
        else:
            kinds.add("mlp")
    if rep.blocks_removed or rep.blocks_added:
        kinds.add("layers")
    return ",".join(sorted(kinds)) or "-"


def run(names, budgets):
    rows, out = [], []
    for name in names:
        build, inputs = _models()[name]
        torch.manual_seed(0)
        try:
            model = build().eval()
        except Exception as e:  # noqa: BLE001
            out.extend({"model": name, "budget": b, "ok": False, "seconds": 0.0,
                        "why": f"config: {type(e).__name__}: {str(e)[:120]}"} for b in budgets)
            continue
        x = inputs()
        for b in budgets:
            rec = {"model": name, "budget": b}
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = fxadapt.transform(model, b, x)
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                rep = fxadapt.report(res)
                before = count_macs(model, x)
                after = count_macs(res, x)
                rec.update(ok=True, ratio=after / before, error=after / before / b - 1,
                           moved=_moved(rep, None))
            except Exception as e:  # noqa: BLE001 - a benchmark records failures
                rec.update(ok=False, seconds=round(time.perf_counter() - t0, 2),
                           why=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            out.append(rec)
            rows.append(rec)
            print(rec, flush=True)
    return out


def table(recs) -> str:
    lines = ["| model | budget | pass | MACs ratio (count_macs) | error | time s | moved / why |",
             "|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["ok"]:
            lines.append(f"| {r['model']} | {r['budget']} | yes | {r['ratio']:.4f} | "
                         f"{100 * r['error']:+.2f}% | {r['seconds']} | {r['moved']} |")
        else:
            lines.append(f"| {r['model']} | {r['budget']} | no | - | - | {r['seconds']} | {r['why']} |")
    n = sum(r["ok"] for r in recs)
    lines.append(f"\npass rate {n}/{len(recs)}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--budgets", type=float, nargs="*", default=[0.25, 0.5, 1.5])
    p.add_argument("--models", nargs="*", default=list(_models()))
    args = p.parse_args()
    torch.set_num_threads(1)
    recs = run(args.models, args.budgets)
    print(table(recs))
    cache = Path(__file__).parent / ".cache"
    cache.mkdir(exist_ok=True)
    (cache / "bench_transformers.json").write_text(json.dumps(recs, indent=1))


if __name__ == "__main__":
    main()
