"""Transformers as people build them (Hugging Face from small configs, a hand-written SDPA model with tied
weights): transform at 0.5 and 1.5, MACs of the result against the original's, both counted here by
FlopCounterMode (not the report), growth function-preserving (checked here against the original's
outputs), GQA heads in whole groups, tied parameters kept tied and named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fxadapt
from fxadapt.analysis.count import count_macs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
transformers = pytest.importorskip("transformers")
import bench_transformers as bt  # noqa: E402

MODELS = ("tied-sdpa", "gpt2", "llama-gqa", "bert", "qwen2-gqa", "vit", "swin", "whisper", "wav2vec2",
          "mobilevit")


def _models():
    cases = dict(bt._models())
    cfg = dict(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160],
               num_attention_heads=4)
    cases["mobilevit"] = (lambda: transformers.MobileViTModel(transformers.MobileViTConfig(**cfg)),
                          lambda: (torch.randn(1, 3, 64, 64),))
    return cases


def _case(name):
    build, inputs = _models()[name]
    torch.manual_seed(0)
    return build().eval(), inputs()


def _called(model, inputs):
    """The call the capture made: HF models with ``use_cache`` in their forward run without the cache."""
    import inspect

    if "use_cache" in inspect.signature(model.forward).parameters:
        kw = inputs if isinstance(inputs, dict) else {}
        return ({**kw, "use_cache": False},) if isinstance(inputs, dict) else (inputs, {"use_cache": False})
    return (inputs,) if isinstance(inputs, dict) else (inputs, {})


def _run(model, inputs):
    args = _called(model, inputs)
    with torch.no_grad():
        return model(**args[0]) if isinstance(args[0], dict) else model(*args[0], **args[1])


def _check(name, budget):
    model, inputs = _case(name)
    out = fxadapt.transform(model, budget, inputs)
    as_call = (lambda m: _called(m, inputs)[0] if isinstance(inputs, dict) else _called(m, inputs))  # noqa: E731
    # independent of the report
    macs, base = count_macs(out, as_call(out)), count_macs(model, as_call(model))
    assert abs(macs / base - budget) <= 0.011 * budget
    if budget > 1:   # growth is function-preserving: the original's outputs, compared here
        torch.testing.assert_close(_run(out, inputs), _run(model, inputs), rtol=1e-4, atol=1e-4)
    return model, out, inputs


@pytest.mark.parametrize("budget", [0.5, 1.5])
@pytest.mark.parametrize("name", MODELS)
def test_transformer_transforms(name, budget):
    _check(name, budget)


def test_gqa_heads_go_in_whole_groups():
    model, out, _ = _check("llama-gqa", 0.5)
    attn = "model.layers.0.self_attn"
    q, k, v = (out.get_submodule(f"{attn}.{p}_proj").out_features for p in "qkv")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    ratio = model.config.num_attention_heads // model.config.num_key_value_heads
    assert k == v and k % head_dim == 0 and q == ratio * k          # kv heads kept with their q heads


def test_tied_weights_stay_tied_and_named():
    model, out, inputs = _check("tied-sdpa", 1.5)
    assert out.lm_head.weight is out.wte.weight
    names = {n for n, _ in out.named_parameters(remove_duplicate=False)}
    assert {"lm_head.weight", "wte.weight"} <= names
    rows = {c.name: (c.before, c.after) for c in fxadapt.report(out).groups}
    assert all(after == before for before, after in rows.values() if before == bt.VOCAB)  # no false vocab row
    small = fxadapt.transform(model, 0.5, inputs)
    assert small.lm_head.weight is small.wte.weight and small.wte.weight.shape[0] == bt.VOCAB


def test_dna_searches_a_causal_lm_on_its_model_output():
    """The search's loss reads ``.logits`` of a ``ModelOutput`` (no wrapper needed); a user loss for
    next-token prediction is passed through ``SearchConfig(loss_fn=...)``."""
    from torch.nn import functional as F

    from fxadapt.search.dna import SearchConfig

    model, _ = _case("gpt2")
    ids = torch.randint(0, bt.VOCAB, (32, bt.SEQ), generator=torch.Generator().manual_seed(0))

    def lm_loss(logits, y):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))

    cfg = SearchConfig(loss_fn=lm_loss, batch_size=8, steps=6, warmup=2, progress=False)
    out = fxadapt.transform(model, 0.5, (ids[:1],), data=(ids, ids), strategy="dna", search=cfg)
    r = fxadapt.report(out)
    assert r.strategy == "dna" and 0.45 <= count_macs(out, (ids[:1],)) / r.macs_before <= 0.5
