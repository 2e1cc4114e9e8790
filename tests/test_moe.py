"""Mixture of experts (transformers' Mixtral: a top-k router and 3-D expert weights run by the ``grouped_mm``
experts implementation): the router freezes only its expert channels, the hidden size and the experts'
intermediate width are prunable, the cost model agrees with the independent count, the adapted model is a
``MixtralForCausalLM`` again (``intermediate_dim``, config fields) that generates, and growth is
function-preserving."""

from __future__ import annotations

import warnings

import pytest
import torch

import fxadapt
from fxadapt.analysis.count import count_macs

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MixtralConfig") or not hasattr(
        transformers.models.mixtral.modeling_mixtral, "MixtralExperts"):
    pytest.skip("this transformers has no 3-D MixtralExperts", allow_module_level=True)

H, I, E, K, V = 32, 48, 4, 2, 64  # noqa: E741  (hidden, intermediate, experts, top-k, vocab)


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                     num_experts_per_tok=K, max_position_embeddings=32, pad_token_id=0,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def _ids(seq=8, batch=1, seed=0):
    return torch.randint(3, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def analysis():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxadapt.analyze(_mixtral(), {"input_ids": _ids()})


def _by_name(a, name):
    return [g for g in a.groups if g.name == name]


def test_router_freezes_only_the_experts(analysis):
    a = analysis
    hidden, = _by_name(a, "model.embed_tokens")
    assert (hidden.width, hidden.prunable, hidden.granularity) == (H, True, 4)   # 16-byte runs of fp32
    experts = [g for g in a.groups if g.name.endswith("mlp.experts")]
    assert [(g.width, g.prunable, g.granularity) for g in experts] == [(2 * I, True, 8)] * 2  # gate|up runs of 4
    routers = [g for g in a.groups if g.name.endswith("mlp.gate")]
    assert [g.width for g in routers] == [E, E]
    assert all(not g.prunable and "topk along the channel axis" in g.reason for g in routers)
    assert a.fired["topk"] == 4 and a.fired["grouped_mm"] == 4 and a.fired["gather_like"] >= 6  # topk+sort
    assert a.uncosted == ()


def test_macs_agree_with_the_independent_count(analysis):
    """Rows are ``T * top_k`` whatever the routing: the cost model's ``T * (top_k/E) * E * K * N`` per grouped
    product is the count of the run at any input."""
    model = _mixtral()
    assert analysis.macs() == count_macs(model, {"input_ids": _ids()})
    assert count_macs(model, {"input_ids": _ids(seed=1)}) == count_macs(model, {"input_ids": _ids(seed=2)})
    moe = 2 * 8 * K * (H * 2 * I + I * H)    # two layers, 8 tokens, gate_up and down
    assert sum(t.value(analysis.cost._n(None)) for t in analysis.cost.macs_terms
               if "grouped_mm" in t.node) == moe


def test_hidden_and_experts_slice_through_the_routing(analysis):
    """A plan that moves the hidden size (the solver may leave it) and each layer's experts differently:
    the sliced graph runs and costs what the cost model says, counted independently."""
    from fxadapt.passes.materialize import materialize

    from fxadapt.planning.plan import make_plan

    a = analysis
    hidden, = _by_name(a, "model.embed_tokens")
    ex0, ex1 = [g for g in a.groups if g.name.endswith("mlp.experts")]
    units = {hidden.id: 5, ex0.id: 3, ex1.id: 9}
    gm = materialize(a.gm, make_plan(a, units)).graph_module
    shapes = {n: tuple(p.shape) for n, p in gm.named_parameters() if "experts" in n}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (E, 24, 20)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (E, 20, 36)
    assert count_macs(gm, (_ids(),)) == a.macs(units=units)


@pytest.mark.parametrize("layers", ["per-layer", "uniform"])
def test_shrink_writes_back_the_experts(layers):
    model, ids = _mixtral(), _ids()
    kw = {"layers": "uniform"} if layers == "uniform" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = fxadapt.transform(model, 0.5, {"input_ids": ids}, **kw)
    assert isinstance(small, transformers.MixtralForCausalLM)
    ratio = count_macs(small, {"input_ids": ids}) / count_macs(model, {"input_ids": ids})
    assert abs(ratio / 0.5 - 1) <= 0.01 + (0.02 if layers == "uniform" else 0)
    for layer in small.model.layers:
        ex = layer.mlp.experts
        assert ex.gate_up_proj.shape == (E, 2 * ex.intermediate_dim, ex.hidden_dim)
        assert ex.down_proj.shape == (E, ex.hidden_dim, ex.intermediate_dim)
        assert ex.intermediate_dim < I
    if layers == "uniform":
        assert small.config.intermediate_size == small.model.layers[0].mlp.experts.intermediate_dim
    out = small.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_growth_is_function_preserving():
    model, ids = _mixtral(), _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = fxadapt.transform(model, 1.5, {"input_ids": ids})
    assert isinstance(big, transformers.MixtralForCausalLM)
    ratio = count_macs(big, {"input_ids": ids}) / count_macs(model, {"input_ids": ids})
    assert abs(ratio / 1.5 - 1) <= 0.01
    assert all(layer.mlp.experts.intermediate_dim > I for layer in big.model.layers)
    other = _ids(seq=11, batch=2, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(big(other).logits, model(other).logits, rtol=1e-4, atol=1e-5)
    prompt = ids[:, :4]
    torch.testing.assert_close(big.generate(prompt, max_new_tokens=4, do_sample=False),
                               model.generate(prompt, max_new_tokens=4, do_sample=False))


def test_sort_along_channels_freezes_with_its_reason():
    """``sort``/``topk`` along a channel axis name positions as data: those channels freeze, nothing else."""
    class Sorted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.sort(h, -1).values), torch.topk(h, 2, dim=0).values.sum()

    a = fxadapt.analyze(Sorted().eval(), (torch.randn(5, 4),))
    g, = [g for g in a.groups if g.name == "a"]
    assert not g.prunable and "sort along the channel axis" in g.reason
