"""The cached path of a written-back model (``fxadapt.pipeline.cache_check``): RWKV allocates every layer's
recurrent state as ``(batch, config.hidden_size, layers)``, so ``generate`` (use_cache=True) needs each
attention width equal to the hidden size, which the graph (captured without the cache) cannot see. The
cached run's sizes name the groups, they are tied and re-planned; where that cannot hold the result warns."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.errors import ReplanWarning
from fxadapt.ir.capture import as_called
from fxadapt.pipeline import cache_check
from fxadapt.writeback import WriteBackWarning

transformers = pytest.importorskip("transformers")
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
X = {"input_ids": torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))}


def _rwkv():
    cfg = transformers.RwkvConfig(vocab_size=96, hidden_size=64, attention_hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, context_length=64, **IDS)
    torch.manual_seed(0)
    model = transformers.RwkvForCausalLM(cfg).eval()
    with torch.no_grad():
        model(**X)   # RWKV rescales its layers on its first eval forward (not traceable)
    return model


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64,
                                  **IDS)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _transform(model, budget):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, budget, X)
    kinds = (ReplanWarning, WriteBackWarning, fxadapt.BudgetWarning)
    return out, [w for w in rec if issubclass(w.category, kinds)]


def _ratio(out, model):
    return count_macs(out, as_called(out, X)) / count_macs(model, as_called(model, X))


def _greedy(model):
    with torch.no_grad():
        return model.generate(**X, max_new_tokens=3, do_sample=False)


def _messages(rec, kind):
    return [str(w.message) for w in rec if w.category is kind]


def test_rwkv_shrunk_is_tied_and_generates():
    model = _rwkv()
    out, rec = _transform(model, 0.5)
    assert type(out) is transformers.RwkvForCausalLM
    tie, = _messages(rec, ReplanWarning)
    assert "rwkv.embeddings" in tie and "rwkv.blocks.0.attention.key" in tie \
            and "rwkv.blocks.1.attention.key" in tie
    assert "the cached path fails" in tie and "size of tensor a" in tie
    assert not _messages(rec, WriteBackWarning)
    assert 0.99 * 0.5 <= _ratio(out, model) <= 0.5 or _messages(rec, fxadapt.BudgetWarning)
    hidden = out.rwkv.embeddings.embedding_dim
    assert all(b.attention.key.out_features == hidden for b in out.rwkv.blocks)
    assert _greedy(out).shape == (1, 11)
    with torch.no_grad():
        torch.testing.assert_close(out(**X, use_cache=True).logits, out(**X, use_cache=False).logits)
    assert fxadapt.report(out).history[0]["ties"]


def test_rwkv_grown_pins_the_attention_to_the_hidden_size_and_generates():
    """At 1.5x the hidden size cannot grow under its LayerNorms; the attention widths tied to it stay at its
    width (``planning.uniform.pinned_by_ties``; was: the tie dropped and a warning that generate fails), the
    MLP carries the growth, growth stays function-preserving and generate gives the original's tokens."""
    model = _rwkv()
    out, rec = _transform(model, 1.5)
    assert type(out) is transformers.RwkvForCausalLM and not _messages(rec, WriteBackWarning)
    tie, = _messages(rec, ReplanWarning)
    hidden = out.config.hidden_size
    assert hidden == model.config.hidden_size
    assert all(b.attention.key.out_features == hidden for b in out.rwkv.blocks)
    assert any(b.feed_forward.key.out_features > m.feed_forward.key.out_features
               for b, m in zip(out.rwkv.blocks, model.rwkv.blocks))
    assert 1.5 <= _ratio(out, model) <= 1.01 * 1.5
    plain = as_called(model, X)
    with torch.no_grad():
        torch.testing.assert_close(plain.call(out).logits, plain.call(model).logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(_greedy(out), _greedy(model))


def test_without_retries_the_result_warns(monkeypatch):
    monkeypatch.setattr(cache_check, "RETRIES", 0)
    model = _rwkv()
    out, rec = _transform(model, 0.5)
    assert type(out) is transformers.RwkvForCausalLM and not _messages(rec, ReplanWarning)
    msg, = _messages(rec, WriteBackWarning)
    assert "RuntimeError: The size of tensor a" in msg and "generate / use_cache=True will not work" in msg
    assert 0.99 * 0.5 <= _ratio(out, model) <= 0.5


def test_strict_raises_where_the_cache_fails(monkeypatch):
    monkeypatch.setattr(cache_check, "RETRIES", 0)
    with pytest.raises(fxadapt.WriteBackError, match="cached path"):
        fxadapt.transform(_rwkv(), 0.5, X, write_back="strict")


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_gpt2_passes_the_cache_check_silently(budget):
    model = _gpt2()
    out, rec = _transform(model, budget)
    assert type(out) is transformers.GPT2LMHeadModel
    assert not _messages(rec, ReplanWarning) and not _messages(rec, WriteBackWarning)
    if budget > 1:
        assert torch.equal(_greedy(out), _greedy(model))
    else:
        assert _greedy(out).shape == (1, 11)


def test_models_without_a_cache_are_skipped():
    lin = torch.nn.Linear(2, 2)
    assert not cache_check.has_cache(lin, fxadapt.ir.inputs.as_inputs(torch.ones(1, 2)))
    assert cache_check.has_cache(_gpt2(), fxadapt.ir.inputs.as_inputs(X))


def test_sizes_are_read_from_the_error():
    assert cache_check._two_sizes("RuntimeError: The size of tensor a (48) must match the size of tensor b "
                                  "(32) at non-singleton dimension 1") == (48, 32)
    assert cache_check._two_sizes("RuntimeError: expected (48) channels, got (32)") == (48, 32)
    assert cache_check._two_sizes("RuntimeError: mat1 and mat2 shapes cannot be multiplied (8x48 and "
                                  "32x48)") is None
    assert cache_check._two_sizes("ValueError: bad") is None
