"""DNA with a latency budget: the expected latency of the gated supernet (``fxadapt.search.latency_loss``)
against a brute-force expectation, its gradient, and the search end to end on a simulated processor
(``fxadapt.hw.sim``), judged by the simulator's own latency of the returned model."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from models import LatencyNet
from torch import nn

import fxadapt
from fxadapt.errors import BudgetError
from fxadapt.hw.sim import SimulatedTarget, fake_lut
from fxadapt.planning.latency import LatencyModel
from fxadapt.search.dna import SearchConfig
from fxadapt.search.latency_loss import ExpectedLatency, width_probs
from fxadapt.search.supernet import SupernetConfig, build_supernet

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
G = torch.Generator().manual_seed(1)
DATA = (torch.randn(192, 3, 16, 16, generator=G), torch.randint(0, 10, (192,), generator=G))
FAST = SearchConfig(steps=24, warmup=6, batch_size=32, progress=False)


def test_expected_latency_is_the_brute_force_expectation():
    """Two gated groups with 6 candidate widths each (every candidate a grid point): E[L] equals the sum over
    all width pairs of P(pair) * the latency model's prediction there, for random gates."""
    m = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1))
    a = fxadapt.analyze(m, (torch.randn(1, 3, 12, 12),))
    sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0, gates="markov"))
    lm = LatencyModel(sn.analysis, fake_lut(), 2e-4)
    gates = sn.width_gates()
    torch.manual_seed(0)
    for g in gates.values():
        g.alpha.data.uniform_(0.3, 1.0)
    el = ExpectedLatency(sn, lm)
    assert all(len(el.grids[gid]) == len(width_probs(g)[0]) for gid, g in gates.items())
    dists = {gid: [(float(w), float(p)) for w, p in zip(*width_probs(g))] for gid, g in gates.items()}
    brute = 0.0
    for combo in itertools.product(*dists.values()):
        n = {gid: int(w) for gid, (w, _) in zip(dists, combo)}
        prob = 1.0
        for _, p in combo:
            prob *= p
        brute += prob * lm.predict(n)
    value = el()
    assert float(value) == pytest.approx(brute, rel=1e-5)
    value.backward()
    assert all(g.alpha.grad is not None and g.alpha.grad.abs().sum() > 0 for g in gates.values())


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LatencyNet().eval()


def test_dna_latency_budget_lands_in_the_window(net):
    t = SimulatedTarget(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxadapt.transform(net, fxadapt.Budget(latency=0.5, target=t), (X,), data=DATA, strategy="dna",
                                search=FAST)
    assert type(out) is LatencyNet
    ratio = t.seconds(out, (X,)) / t.seconds(net, (X,))
    assert 0.9 * 0.5 * 0.98 <= ratio <= 0.5 * 1.02
    r = fxadapt.report(out)
    assert any("expected latency" in str(h.get("searched", "")) for h in r.history)
    assert "latency (measured on the target)" in r.table()


def test_dna_latency_and_macs_budgets_both_hold(net):
    from fxadapt.analysis.count import count_macs

    t = SimulatedTarget(seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxadapt.transform(net, fxadapt.Budget(latency=0.8, macs=0.4, target=t), (X,), data=DATA,
                                strategy="dna", search=FAST)
    assert count_macs(out, (X,)) <= 0.4 * count_macs(net, (X,)) * (1 + 1e-6)
    assert t.seconds(out, (X,)) / t.seconds(net, (X,)) <= 0.8 * 1.02


def test_fur_refuses_a_latency_budget_with_what_to_use(net):
    with pytest.raises(BudgetError, match="strategy='dna'.*'datafree'"):
        fxadapt.transform(net, fxadapt.Budget(latency=0.5, target=SimulatedTarget()), (X,), data=DATA,
                          strategy="fur")
