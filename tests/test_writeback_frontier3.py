"""Write-back of models whose code reads a size at run time that the plan must keep consistent (issue 27):
an attention output reshaped to its *input's* width (PVT-v2's ``reshape(b, n, num_channels)``,
PEGASUS-X's ``view(b, n, hidden_dim)``), where the input's group counts channels and the attention's counts
whole heads or head dims, so the tie between them is one in channels (``planning.uniform``); and two sizes
a module compares (``Apart``). Checked against the original model and FlopCounterMode, never the code's
own numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.planning.solver import SolveConfig
from fxadapt.planning.uniform import Apart, Tying, shared_widths

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _adapted(model, budget, inputs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, budget, inputs)
    return out, [w for w in seen if issubclass(w.category, fxadapt.WriteBackWarning)]


def _in_window(out, model, inputs, budget):
    """The result's MACs by the independent count, against ``budget`` times the original's."""
    ratio = count_macs(out, inputs) / count_macs(model, inputs)
    assert abs(ratio - budget) <= 0.011 * budget, ratio


def test_pvt_v2_growth_ties_heads_to_the_stage_width_and_comes_back_as_its_class():
    """1.5x: every stage's heads grow, while the model reshapes the attention output by the input's
    channel count; the re-plan ties each stage's width (channels) to its heads (16 channels each)."""
    cfg = transformers.PvtV2Config(image_size=32, hidden_sizes=[16, 32], depths=[1, 1],
                                   num_attention_heads=[1, 2], num_labels=10, num_encoder_blocks=2,
                                   sr_ratios=[2, 1], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[4, 4])
    torch.manual_seed(0)
    model = transformers.PvtV2ForImageClassification(cfg).eval()
    x = {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    out, fallback = _adapted(model, 1.5, x)
    assert not fallback and type(out) is type(model)
    _in_window(out, model, x, 1.5)
    for blk in (m for m in out.modules() if type(m).__name__ == "PvtV2SelfAttention"):
        assert blk.query.out_features == blk.num_attention_heads * blk.attention_head_size
        assert blk.value.out_features == blk.query.in_features       # all-head size == input width
    with torch.no_grad():      # growth is function-preserving: the original's logits
        torch.testing.assert_close(out(**x).logits, model(**x).logits, rtol=1e-4, atol=1e-5)


def test_pegasus_x_attention_keeps_the_frozen_hidden_width_and_generates():
    """0.5x: PEGASUS-X's global-local attention views its output by the input's width (the shared hidden
    size, frozen): the attention groups are tied to it (pinned), the MLPs and the decoder reach the
    budget."""
    cfg = transformers.PegasusXConfig(
        vocab_size=256, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        decoder_start_token_id=0, forced_eos_token_id=None, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        block_size=4, num_global_tokens=2)
    torch.manual_seed(0)
    model = transformers.PegasusXForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(3, 256, (1, 8), generator=g), "attention_mask": torch.ones(1, 8).long(),
         "decoder_input_ids": torch.randint(3, 256, (1, 4), generator=g)}
    out, fallback = _adapted(model, 0.5, x)
    assert not fallback and type(out) is type(model)
    _in_window(out, model, x, 0.5)
    for layer in out.model.encoder.layers:
        attn = layer.self_attn
        assert attn.v_proj.out_features == attn.out_proj.in_features == cfg.d_model
    got = out.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=3,
                       do_sample=False)
    assert got.shape[0] == 1 and got.shape[1] >= 2


def test_hiera_keeps_a_pooling_stage_wider_than_its_input():
    """0.5x: a Hiera layer projects and pools only ``if hidden_size != hidden_size_output``; a plan giving a
    stage its input's width is re-planned with the two kept apart, and the attention's window size (equal to
    its pruned head count) is left alone."""
    cfg = transformers.HieraConfig(image_size=[64, 64], embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 2, 4, 8], num_labels=10)
    torch.manual_seed(0)
    model = transformers.HieraForImageClassification(cfg).eval()
    x = {"pixel_values": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    out, fallback = _adapted(model, 0.5, x)
    assert not fallback and type(out) is type(model)
    _in_window(out, model, x, 0.5)
    pairs = [(m, o) for m, o in zip(model.modules(), out.modules()) if type(m).__name__ == "HieraLayer"]
    differ = lambda layer: layer.hidden_size != layer.hidden_size_output  # noqa: E731
    for before, after in pairs:
        assert differ(before) == differ(after)
        assert after.attn.window_size == before.attn.window_size
    with torch.no_grad():
        assert out(**x).logits.shape == model(**x).logits.shape


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 64), nn.Linear(64, 128), nn.Linear(128, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_apart_keeps_two_widths_different_and_the_budget():
    """Two groups a module compares (``if hidden_size != hidden_size_output``) started at one width: the
    ``Apart`` pair moves them apart, still inside the MAC window (counted here by hand)."""
    torch.manual_seed(0)
    model = _Chain()
    a = fxadapt.analyze(model, (torch.randn(2, 8),))
    ga, gb = (next(g.id for g in a.prunable if g.units == u) for u in (64, 128))
    macs = lambda n: 2 * (8 * n[ga] + n[ga] * n[gb] + n[gb] * 4)      # batch 2: the three matmuls
    start = {ga: 48, gb: 48}
    target = float(macs(start))
    cfg = SolveConfig(align=1)
    same, _, _ = shared_widths(a, start, target, cfg, tying=Tying(False, ()))
    assert same[ga] == same[gb] == 48                                 # the control: in the window as it is
    out, _, _ = shared_widths(a, start, target, cfg, tying=Tying(False, (Apart({ga, gb}),)))
    assert out[ga] != out[gb]
    assert target * (1 - cfg.tol) <= macs(out) <= target
