"""Saved configs stock loaders read right or refuse (``fxadapt.writeback.stock``), uniform widths the family's
config can state (``fxadapt.planning.stated``), recipes that follow the model
(``fxadapt.writeback.follow``)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import fxadapt
from fxadapt.writeback import stock

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()

V = 500
IDS = {"input_ids": torch.randint(5, V, (2, 12), generator=torch.Generator().manual_seed(0))}


def _llama():
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2)).eval()


def _gpt2():
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_embd=64, n_head=4, n_layer=2,
                                          n_positions=64)).eval()


def _transform(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxadapt.WriteBackWarning)
        return fxadapt.transform(model, budget, IDS, **kw)


def test_gpt2_uniform_moves_whole_heads_with_the_hidden_size_and_states_n_inner(tmp_path):
    """GPT-2 derives head_dim = n_embd / n_head and n_inner = 4 n_embd when None (was: n_embd=80, n_head=5,
    n_inner left None, so from_config silently built a 4 x 80 MLP)."""
    small = _transform(_gpt2(), 0.5, layers="uniform")
    cfg, attn, mlp = small.config, small.transformer.h[0].attn, small.transformer.h[0].mlp
    assert cfg.n_embd < 64 and cfg.n_embd == cfg.n_head * 16 == attn.embed_dim
    assert cfg.n_inner == mlp.c_fc.weight.shape[1] and not hasattr(cfg, "fxadapt_recipe")
    assert stock.verdict(small) == "rebuilds"
    small.save_pretrained(tmp_path)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(**IDS).logits, small(**IDS).logits, rtol=1e-5, atol=1e-5)


def test_llama_uniform_growth_picks_heads_that_divide_the_hidden_size(tmp_path):
    """Llama validates hidden % heads == 0: at 1.5 the plan takes 8 heads on 64, not 10 (the config could
    not state 10; was: a recipe)."""
    small = _transform(_llama(), 1.5, layers="uniform")
    cfg = small.config
    assert 64 % cfg.num_attention_heads == 0 and not hasattr(cfg, "fxadapt_recipe")
    assert stock.verdict(small) == "rebuilds"


def test_per_layer_sizes_are_marked_so_stock_loaders_refuse_them(tmp_path):
    """Layers of different MLP widths: config.json states the list of them (was: the original's
    intermediate_size, which from_config built without a word); AutoConfig refuses the list,
    fxadapt.from_pretrained replays the recipe."""
    small = _transform(_llama(), 0.5, layers="any")
    widths = [layer.mlp.up_proj.weight.shape[0] for layer in small.model.layers]
    assert len(set(widths)) == 2, widths   # the case under test: layers that disagree
    assert small.config.intermediate_size == widths and stock.verdict(small) == "refuses"
    small.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == widths
    with pytest.raises(Exception, match="intermediate_size"):
        T.AutoConfig.from_pretrained(tmp_path)
    again = fxadapt.from_pretrained(tmp_path)
    torch.testing.assert_close(again(**IDS).logits, small(**IDS).logits, rtol=1e-5, atol=1e-5)
    assert again.config.intermediate_size == widths
    again.save_pretrained(tmp_path / "again")   # a reloaded model saves and reloads the same way
    torch.testing.assert_close(fxadapt.from_pretrained(tmp_path / "again")(**IDS).logits, small(**IDS).logits,
                               rtol=1e-5, atol=1e-5)


def test_recipe_follows_resize_token_embeddings_through_save_pretrained(tmp_path):
    """Was: "saved config's recipe resizes model.embed_tokens.weight to (1000, 80), checkpoint has (1100,
    80)"."""
    small = _transform(_llama(), 0.5, layers="any")
    small.resize_token_embeddings(V + 100)
    small.save_pretrained(tmp_path)
    again = fxadapt.from_pretrained(tmp_path)
    ids = {"input_ids": torch.randint(0, V + 100, (2, 9))}
    torch.testing.assert_close(again(**ids).logits, small(**ids).logits, rtol=1e-5, atol=1e-5)
    emb = again.get_input_embeddings()
    assert emb.num_embeddings == V + 100 and emb.embedding_dim == emb.weight.shape[1] < 64


def test_fxadapt_save_follows_the_model_too(tmp_path):
    small = _transform(_gpt2(), 0.5)
    small.resize_token_embeddings(V + 7)
    fxadapt.save(small, tmp_path / "s.pt")
    again = fxadapt.load(tmp_path / "s.pt", model=_gpt2())
    ids = {"input_ids": torch.randint(0, V + 7, (2, 9))}
    torch.testing.assert_close(again(**ids).logits, small(**ids).logits, rtol=1e-5, atol=1e-5)
