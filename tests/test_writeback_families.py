"""Tied / shared parameters across families (issue 18, item 1), checked on the written-back model against the
original: T5 / BART (``shared`` = encoder and decoder embeddings = LM head) and RoBERTa's masked-LM head
(``lm_head.bias`` = ``lm_head.decoder.bias``) used to crash; now they adapt, keep every tie, and the
encoder-decoders ``generate`` (grown: the original's greedy tokens)."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxadapt
from fxadapt.analysis.count import count_macs

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
ENC_DEC = {"input_ids": IDS, "decoder_input_ids": IDS[:, :6]}


def _bart():
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


def _t5():
    return T.T5ForConditionalGeneration(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                   num_decoder_layers=2, num_heads=4))


def _adapt(model, budget, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fxadapt.transform(model, budget, inputs)


@pytest.mark.parametrize("budget", [0.75, 1.5])
@pytest.mark.parametrize("build", [_bart, _t5], ids=["bart", "t5"])
def test_encoder_decoder_keeps_its_shared_embedding_and_generates(build, budget):
    torch.manual_seed(0)
    model = build().eval()
    out = _adapt(model, budget, ENC_DEC)
    assert type(out) is type(model)
    shared = out.get_input_embeddings().weight
    assert shared is out.get_output_embeddings().weight and shared is out.get_encoder().embed_tokens.weight
    calls = {**ENC_DEC, "use_cache": False}
    ratio = count_macs(out, calls) / count_macs(model, calls)
    assert abs(ratio - budget) <= 0.011 * budget
    start = dict(max_new_tokens=5, do_sample=False, decoder_start_token_id=0)
    tokens = out.generate(IDS[:1], **start)
    assert tokens.shape[0] == 1
    if budget > 1:
        assert torch.equal(tokens, model.generate(IDS[:1], **start))
    other = out(input_ids=torch.randint(0, 100, (3, 20)), decoder_input_ids=torch.randint(0, 100, (3, 4)))
    assert other.logits.shape == (3, 4, 100)


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_roberta_masked_lm_keeps_its_tied_bias(budget):
    torch.manual_seed(0)
    model = T.RobertaForMaskedLM(T.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=64)).eval()
    out = _adapt(model, budget, {"input_ids": IDS})
    assert type(out) is type(model)
    assert out.lm_head.bias is out.lm_head.decoder.bias                 # one tensor, both names
    assert out.lm_head.decoder.weight is out.roberta.embeddings.word_embeddings.weight
    assert abs(count_macs(out, {"input_ids": IDS}) / count_macs(model, {"input_ids": IDS}) - budget) \
            <= 0.011 * budget
    if budget > 1:
        torch.testing.assert_close(out(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)
