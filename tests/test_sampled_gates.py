"""Sampled width gates (Gumbel, FBNetV2; Gumbel-top-k, MSG-DAS) and sampled depth gates: the gated supernet
still computes the original function in eval mode, a training forward uses one discrete width per group
(the same at every site of the group), the noise-free expected units equal the Monte-Carlo mean of the
sampled widths (Gumbel-max trick, checked by drawing), hardened gates cost what the materialised model
counts, and DNA with either kind lands on budget and resumes exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fxadapt.passes.insert_gates import SampledWidthGate
from fxadapt.passes.materialize import apply_plan
from models import ResNetTiny, resnet_tiny_macs
from transform_harness import hand_macs

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.pipeline.transform import SearchInterrupted, TransformConfig
from fxadapt.search.dna import SearchConfig, SearchConfigError, harden_gates
from fxadapt.search.fur import FurConfig
from fxadapt.search.supernet import SupernetConfig, build_supernet

X1 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
gen = torch.Generator().manual_seed(0)
DATA = (torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen))


def _fast(kind: str, **kw) -> SearchConfig:
    return SearchConfig(steps=12, warmup=3, batch_size=16, progress=False,
                        supernet=SupernetConfig(gates=kind), **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResNetTiny().eval()


@pytest.mark.parametrize("kind", ["gumbel", "topk"])
def test_eval_mode_reproduces_original(model, kind):
    sn = build_supernet(fxadapt.analyze(model, (X1,)), None, SupernetConfig(gates=kind))
    assert all(isinstance(g, SampledWidthGate) for g in sn.width_gates().values()) and sn.sampled
    x = torch.randn(4, 3, 8, 8)
    sn.gm.eval()
    torch.testing.assert_close(sn.gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_gumbel_forward_is_one_width_per_group_and_mean_is_expected(model):
    sn = build_supernet(fxadapt.analyze(model, (X1,)), None, SupernetConfig(gates="gumbel"))
    sn.gm.train()
    gate = next(iter(sn.width_gates().values()))
    with torch.no_grad():
        gate.theta.copy_(torch.linspace(-1.0, 1.5, len(gate.theta)))
    g, draws, counts = torch.Generator().manual_seed(3), 4000, []
    for _ in range(draws):
        gate.resample(g)
        m = gate()
        assert set(m.detach().unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m, gate())                         # every site of the group sees the same mask
        counts.append(float(m.detach().sum()))
    std = float(torch.tensor(counts).std()) / draws ** 0.5
    assert abs(sum(counts) / draws - float(gate.expected_units())) < 4 * std + 1e-6


def test_gumbel_gradient_reaches_theta_and_topk_mixes_paths(model):
    sn = build_supernet(fxadapt.analyze(model, (X1,)), None, SupernetConfig(gates="topk", top_k=2))
    sn.gm.train()
    sn.resample(torch.Generator().manual_seed(0), tau=0.5)
    gate = next(iter(sn.width_gates().values()))
    y = gate.choice()
    assert int((y > 0).sum()) == 2 and abs(float(y.sum()) - 1) < 1e-6
    sn.gm(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = [p.grad for n, p in sn.gm.named_parameters() if n.endswith("theta")]
    # groups inside the inactive (zero-initialised, gate 0) block slots get none; the others do
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in grads) >= len(grads) - 2


def test_hardened_sampled_gates_cost_what_the_model_counts(model):
    sn = build_supernet(fxadapt.analyze(model, (X1,)), None, SupernetConfig(gates="gumbel"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in sn.width_gates().values():
            gate.theta.copy_(torch.randn(gate.theta.shape, generator=g))
        for gate in sn.depth_gates().values():
            gate.beta.fill_(float(torch.rand((), generator=g)))
    harden_gates(sn)
    units, present = sn.hard()
    expected = float(sn.expected_macs())
    assert expected == pytest.approx(sn.analysis.cost.macs(units, present), rel=1e-6)
    out = apply_plan(*sn.finalize(units, present)).graph_module
    assert count_macs(out, (X1,)) == pytest.approx(expected, rel=1e-6)
    assert count_macs(out, (X1,)) == hand_macs(out, X1)


@pytest.mark.parametrize("kind,budget", [("gumbel", 0.5), ("topk", 0.5), ("gumbel", 1.6)])
def test_dna_with_sampled_gates_lands_on_budget(model, kind, budget):
    cfg = TransformConfig(search=_fast(kind))
    out = fxadapt.transform(model, budget, (X1,), data=DATA, strategy="dna", config=cfg)
    ratio = hand_macs(out, X1) / resnet_tiny_macs(hw=8)
    assert (budget * 0.99 <= ratio <= budget) if budget < 1 else (budget <= ratio <= budget * 1.01)
    hist = fxadapt.report(out).history
    assert hist[-2]["macs_ratio"] != hist[0]["macs_ratio"]    # the gates moved


def test_sampled_search_resumes_exactly(model, tmp_path):
    ck = str(tmp_path / "search.pt")
    fast = _fast("gumbel")
    straight = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                                 config=TransformConfig(search=fast))
    cut = dataclasses.replace(fast, checkpoint=ck, checkpoint_every=4, stop_after=6)
    with pytest.raises(SearchInterrupted):
        fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=TransformConfig(search=cut))
    resumed = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                                config=TransformConfig(search=dataclasses.replace(cut, stop_after=None)))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(resumed.eval()(x), straight.eval()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("over", [dict(sandwich=True), dict(entropy_of="alpha")])
def test_markov_only_options_refuse_sampled_gates(model, over):
    with pytest.raises(SearchConfigError, match="Markov"):
        fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                          config=TransformConfig(search=_fast("gumbel", **over)))


def test_unknown_gate_kind_is_a_clear_error(model):
    with pytest.raises(SearchConfigError, match="gates must be"):
        fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                          config=TransformConfig(search=_fast("bernoulli")))


def test_fur_bernoulli_dropchannel_lands_on_budget(model):
    cfg = TransformConfig(fur=FurConfig(iterations=2, train_steps=4, batch_size=16, draws=2, val_samples=32,
                                        noise="bernoulli"))
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="fur", config=cfg)
    assert 0.495 <= hand_macs(out, X1) / resnet_tiny_macs(hw=8) <= 0.5


def test_expected_macs_is_the_mean_cost_of_sampled_architectures(model):
    """DenseNAS's chained expected cost: every block's cost weighted by its presence and the widths around
    it. The cost polynomial is multilinear in independent gates, so evaluating it at expected units and
    depth probabilities gives exactly E[MACs] of the sampled architecture; checked by drawing."""
    sn = build_supernet(fxadapt.analyze(model, (X1,)), None, SupernetConfig(gates="gumbel"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for gate in sn.width_gates().values():
            gate.theta.copy_(2 * torch.randn(gate.theta.shape, generator=g))
        for gate in sn.depth_gates().values():
            gate.beta.fill_(float(torch.rand((), generator=g)))
    sn.gm.train()
    costs = []
    for _ in range(3000):
        sn.resample(g)
        units = {gid: gate.n_min + int(float((gate._tail(gate.choice().detach()) * gate.bin_size).sum()))
            for gid, gate in sn.width_gates().items()}
        present = {bid: float(gate().detach()) for bid, gate in sn.depth_gates().items()}
        costs.append(sn.analysis.cost.macs(units, present))
    c = torch.tensor(costs, dtype=torch.float64)
    se = float(c.std()) / len(c) ** 0.5
    assert abs(float(c.mean()) - float(sn.expected_macs().detach())) < 4 * se
    assert float(c.std()) > 0.05 * float(c.mean())          # the draws really varied


def test_mask_gradient_from_bfloat16_activations_matches_exact_autograd():
    """The site mask keeps its input in bfloat16 for the mask gradient only: forward and input gradient are
    exact, the mask gradient matches plain ``x * m`` autograd to bfloat16 precision."""
    from fxadapt.passes.insert_gates import SiteMask

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=g, requires_grad=True)
    unit = torch.rand(6, generator=g).requires_grad_(True)
    site = SiteMask(torch.arange(6), axis=1, ndim=4)
    w = torch.randn(4, 6, 5, 5, generator=g)
    (site(x, unit) * w).sum().backward()
    x2, unit2 = x.detach().clone().requires_grad_(True), unit.detach().clone().requires_grad_(True)
    (x2 * unit2.view(1, -1, 1, 1) * w).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(unit.grad, unit2.grad, rtol=2e-2, atol=1e-2)
