"""``capture`` of Hugging Face models as users call them (small configs, no download): keyword inputs with
``attention_mask``, int64 token ids with a dynamic batch axis, the default ``use_cache`` (the KV cache is
dropped, with a warning), grouped-query attention, and ``ModelOutput`` results of the model's own type."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxadapt
from fxadapt import CaptureError
from fxadapt.ir.capture import FIXED_KEY, INPUTS_KEY, as_called
from fxadapt.ir.inputs import as_inputs

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, SEQ = 1000, 8
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _tokens(batch: int, seed: int, **extra) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[-1, :3] = 0  # one padded row
    return {"input_ids": torch.randint(0, VOCAB, (batch, SEQ), generator=g), "attention_mask": mask, **extra}


def _model(build, seed=0):
    torch.manual_seed(seed)
    return build().eval()


def _captured_matches(model, example, other):
    """Capture on ``example``; the capture equals the original (called as capture calls it) on ``example``
    and on ``other`` (batch 3), returns the model's own output type, and analyses."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxadapt.capture(model, example)
    for ex in (example, other):
        inputs = as_inputs(ex)
        with torch.no_grad():
            out, ref = inputs.call(gm), as_called(model, inputs).call(model)
        assert type(out) is type(ref)
        assert list(out.keys()) == list(ref.keys())
        torch.testing.assert_close(out.to_tuple(), ref.to_tuple(), rtol=1e-5, atol=1e-5)
        assert out.to_tuple()[0].shape[0] == inputs.batch
    assert gm.meta[INPUTS_KEY].batch == as_inputs(example).batch
    fxadapt.analyze(gm)
    return gm, [str(w.message) for w in caught if "fxadapt" in str(w.message)]


def test_bert_with_attention_mask_and_int64_tokens():
    model = _model(lambda: transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, **SMALL)))
    gm, _ = _captured_matches(model, _tokens(1, 0), _tokens(3, 1))
    ids = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids"]
    assert ids and ids[0].dtype == torch.int64


def test_gpt2_default_use_cache_is_dropped_with_a_warning():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    model = _model(lambda: transformers.GPT2LMHeadModel(cfg))
    assert model.config.use_cache
    gm, said = _captured_matches(model, _tokens(1, 0), _tokens(3, 1))
    assert any("use_cache=False" in s for s in said)
    assert gm.meta[FIXED_KEY] == {"use_cache": False}
    assert gm(**_tokens(3, 2)).logits.shape == (3, SEQ, VOCAB)
    assert "forward" not in vars(model) and model.config.use_cache  # the caller's model is untouched


@pytest.mark.parametrize("name", ["Llama", "Qwen2"])
def test_grouped_query_attention_causal_lm(name):
    cfg = getattr(transformers, f"{name}Config")(num_key_value_heads=2, vocab_size=VOCAB, **SMALL)
    model = _model(lambda: getattr(transformers, f"{name}ForCausalLM")(cfg))
    gm, _ = _captured_matches(model, _tokens(1, 0), _tokens(3, 1))
    assert type(gm(**_tokens(2, 3))).__name__ == "CausalLMOutputWithPast"


def test_vit_pixel_values():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, **SMALL)
    model = _model(lambda: transformers.ViTModel(cfg))
    x1, x3 = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)
    gm, said = _captured_matches(model, {"pixel_values": x1}, {"pixel_values": x3})
    assert not said  # ViT takes no use_cache
    torch.testing.assert_close(gm(x3).pooler_output, model(x3).pooler_output, rtol=1e-5, atol=1e-5)


def test_classifier_with_positional_ids_and_keyword_extras():
    cfg = transformers.BertConfig(vocab_size=VOCAB, num_labels=3, **SMALL)
    model = _model(lambda: transformers.BertForSequenceClassification(cfg))

    def pair(batch, seed):
        t = _tokens(batch, seed, token_type_ids=torch.zeros(batch, SEQ, dtype=torch.long))
        return (t.pop("input_ids"),), t

    gm, _ = _captured_matches(model, pair(1, 0), pair(3, 1))
    assert gm(*pair(3, 4)[0], **pair(3, 4)[1]).logits.shape == (3, 3)


def test_explicit_use_cache_true_says_what_to_do():
    cfg = transformers.LlamaConfig(num_key_value_heads=2, vocab_size=VOCAB, **SMALL)
    model = _model(lambda: transformers.LlamaForCausalLM(cfg))
    with pytest.raises(CaptureError, match="DynamicCache.*use_cache=False"):
        fxadapt.capture(model, _tokens(1, 0, use_cache=True))


@pytest.mark.slow
def test_gpt2_full_default_config():
    model = _model(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()))
    ids = {"input_ids": torch.randint(0, 50257, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    ids3 = {"input_ids": torch.randint(0, 50257, (3, 8)),
            "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    _captured_matches(model, ids, ids3)
