"""Regressions from the sweep of families new in issue 27's second round (``bench/hf_families_new.py``), each
on the sweep's tiny config: the result comes back as the user's class (no ``WriteBackWarning``), within 1%
of the budget by an independent FlopCounterMode count, equal to the original after a function-preserving
growth, and ``generate`` runs; or a refusal that names the op.

- Doge: an attention whose ``num_key_value_groups`` equals its old key/value head count (both 2, the length
  of its own ``A``): the groups the attention call measures win over the "changed axes" evidence.
- MiniCPM3: ``config.logits_scaling`` is a property ``hidden_size / dim_model_base``; setting the new hidden
  size would rescale the logits, so the field keeps its value and the recipe carries the size.
- Moonshine: every attention reads ``config.num_key_value_heads``, an alias of
  ``decoder_num_key_value_heads``; the per-module config view is keyed by the aliased name. At 1.5 the
  key/value heads were measured on the ``[b, s, h, d]`` tensor before the transpose (4 decoder tokens).
- Wav2Vec2-Conformer (rotary): ``num_heads`` splits the attention's *input* for the rotary embedding; the
  retry leaves head counts the attention views infer as they were.
- Data2Vec-Audio: a ``LayerNorm(elementwise_affine=False)`` has no tensors; its graph twin gives its shape.
- LongT5: T5's cross-attention makes a zero position bias of ``(1, n_heads, q, k)``: a constructor's sizes
  are size evidence like a view's.
- AFMoE: ``sdpa(...).transpose(1, 2).view(...)`` relies on the producer's layout; capture makes it a reshape.
- SigLIP2: an ``item()`` in the graph: the shape check runs it for real instead of crashing on fake tensors.
- BiT: weight standardisation is a ``batch_norm`` with no tensors: not lifted (was a crash in capture).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.ir.capture import as_called

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from hf_families_new import NEW_FAMILIES  # noqa: E402


def _adapt(name: str, budget: float):
    fam = NEW_FAMILIES[name]
    model, x = fam.build(), fam.example()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, budget, x)
    wb = [str(w.message) for w in caught if issubclass(w.category, fxadapt.WriteBackWarning)]
    assert not wb, wb[0][:400]
    assert type(out) is type(model)
    base = count_macs(model, as_called(model, x))
    got = count_macs(out, as_called(out, x))
    assert abs(got / (budget * base) - 1) <= 0.01, (got / base, budget)
    return fam, model, out, x


def _logits(m, x):
    with torch.no_grad():
        return m(**as_called(m, x).kwargs).logits


def _generates(fam, model, out, grown: bool):
    with torch.no_grad():
        got = out.generate(**fam.gen(), max_new_tokens=3, do_sample=False)
        if grown:
            assert torch.equal(got, model.generate(**fam.gen(), max_new_tokens=3, do_sample=False))


def test_doge_growth_keeps_its_groups():
    fam, model, out, x = _adapt("doge", 1.5)
    attn, was = out.model.layers[0].self_attn, model.model.layers[0].self_attn
    assert attn.k_proj.out_features > was.k_proj.out_features      # key/value heads grew
    assert attn.num_key_value_groups == was.num_key_value_groups == 2
    torch.testing.assert_close(_logits(out, x), _logits(model, x), atol=1e-4, rtol=0)
    _generates(fam, model, out, grown=True)


def test_minicpm3_keeps_its_logit_scale():
    fam, model, out, x = _adapt("minicpm3", 0.5)
    assert out.model.embed_tokens.weight.shape[1] < model.config.hidden_size
    assert out.config.logits_scaling == model.config.logits_scaling
    _generates(fam, model, out, grown=False)


@pytest.mark.parametrize("budget", [0.5, 1.5])
def test_moonshine_speech_encoder_decoder_writes_back_and_generates(budget):
    fam, model, out, _ = _adapt("moonshine", budget)
    _generates(fam, model, out, grown=budget > 1)


@pytest.mark.parametrize("name", ["wav2vec2-conformer", "data2vec-audio", "siglip2_vision_model"])
def test_audio_and_vision_encoders_write_back(name):
    _adapt(name, 0.5)


def test_longt5_cross_attention_heads_follow_the_zero_bias():
    fam, model, out, _ = _adapt("longt5", 0.5)
    _generates(fam, model, out, grown=False)


def test_afmoe_view_of_a_transpose_survives_pruning():
    fam, model, out, _ = _adapt("afmoe", 0.5)
    _generates(fam, model, out, grown=False)


def test_bit_weight_standardisation_is_captured():
    fam = NEW_FAMILIES["bit"]
    g = fxadapt.capture(fam.build(), fam.example())
    bn = [n for n in g.graph.nodes if "batch_norm" in str(n.target)]
    assert bn, "the weight standardisation's batch_norm is kept as an ATen call"
