"""Elastic search: gated supernet identity, expected vs hard cost, budget-loss direction, DNA and FUR
landing on budget, and checkpoint/resume equal to an uninterrupted run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import ResNetTiny

import fxadapt
from fxadapt.search.fur import FurConfig, adjust
from fxadapt.search.dna import SearchConfig, budget_loss
from fxadapt.passes.materialize import apply_plan
from fxadapt.search.supernet import SupernetConfig, build_supernet
from fxadapt.analysis.count import count_macs
from fxadapt.pipeline.transform import SearchInterrupted, TransformConfig

X1 = torch.randn(1, 3, 8, 8)
gen = torch.Generator().manual_seed(0)
DATA = (torch.randn(64, 3, 8, 8, generator=gen), torch.randint(0, 5, (64,), generator=gen))
FAST = SearchConfig(steps=12, warmup=3, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def model():
    return ResNetTiny().eval()


@pytest.fixture(scope="module")
def supernet(model):
    return build_supernet(fxadapt.analyze(model, (X1,)), None, SupernetConfig(expand=1.5, depth_slots=1))


def test_gates_at_init_reproduce_original(model, supernet):
    x = torch.randn(4, 3, 8, 8)
    supernet.gm.eval()
    torch.testing.assert_close(supernet.gm(x), model(x), rtol=1e-5, atol=1e-6)
    assert len(supernet.spec.widths) == 7 and sum(supernet.spec.depths.values()) == 2
    assert len(supernet.spec.depths) == 4                                  # 2 blocks + 2 inactive slots
    assert float(supernet.expected_macs().detach()) == fxadapt.analyze(model, (X1,)).macs()


def test_expected_cost_equals_hard_cost_at_01_gates(supernet):
    sn = build_supernet(fxadapt.analyze(ResNetTiny().eval(), (X1,)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for gate in sn.width_gates().values():
            gate.alpha.copy_(torch.randint(0, 2, gate.alpha.shape, generator=g).float())
            gate.alpha[0] = 1.0
        for gate in sn.depth_gates().values():
            gate.beta.fill_(float(torch.randint(0, 2, (1,), generator=g)))
    units, present = sn.hard()
    expected = float(sn.expected_macs())
    assert expected == sn.analysis.cost.macs(units, present)
    out = apply_plan(*sn.finalize(units, present)).graph_module
    assert count_macs(out, (X1,)) == expected


def test_budget_loss_pushes_toward_target(supernet):
    sn = build_supernet(fxadapt.analyze(ResNetTiny().eval(), (X1,)))
    base = float(sn.expected_macs())
    opt = torch.optim.Adam(sn.arch_parameters(), lr=0.1)
    for _ in range(8):
        opt.zero_grad()
        budget_loss(sn.expected_macs(), 0.5 * base, False, 0.03).backward()
        opt.step()
        with torch.no_grad():
            for p in sn.arch_parameters():
                p.clamp_(0, 1)
    assert float(sn.expected_macs()) < 0.8 * base
    assert float(budget_loss(torch.tensor(0.49), 0.5, False, 0.03)) == 0.0
    assert float(budget_loss(torch.tensor(0.51), 0.5, True, 0.03)) == 0.0


@pytest.mark.parametrize("budget", [0.5, 1.6])
def test_dna_lands_on_budget(model, budget):
    cfg = TransformConfig(search=FAST)
    out = fxadapt.transform(model, budget, (X1,), data=DATA, strategy="dna", config=cfg)
    rep = fxadapt.report(out)
    ratio = rep.macs_after / rep.macs_before
    assert (budget * 0.99 <= ratio <= budget) if budget < 1 else (budget <= ratio <= budget * 1.01)
    assert rep.strategy == "dna" and len(rep.history) == FAST.steps + 1
    assert {"loss", "macs_ratio", "entropy"} <= set(rep.history[0])


def test_fur_lands_on_budget(model):
    cfg = TransformConfig(fur=FurConfig(iterations=2, train_steps=4, batch_size=16, draws=2, val_samples=32))
    out = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="fur", config=cfg)
    rep = fxadapt.report(out)
    assert 0.495 <= rep.macs_after / rep.macs_before <= 0.5
    assert [h["iteration"] for h in rep.history[:-1]] == [0, 1]


def test_adjust_grows_high_fur_and_shrinks_low():
    units = {0: 10, 1: 10, 2: 10, 3: 10}
    out = adjust(units, {0: 4.0, 1: 3.0, 2: 2.0, 3: 1.0}, {g: 10 for g in units}, 0.2)
    assert out[0] > out[1] >= 10 and out[3] < out[2] <= 10


def test_checkpoint_resume_equals_uninterrupted(model, tmp_path):
    ck = str(tmp_path / "search.pt")
    straight = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                                 config=TransformConfig(search=FAST, fold_bn=False))
    cut = dataclasses.replace(FAST, checkpoint=ck, checkpoint_every=4, stop_after=6)
    with pytest.raises(SearchInterrupted, match="resumes"):
        fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna", config=TransformConfig(search=cut))
    resumed = fxadapt.transform(model, 0.5, (X1,), data=DATA, strategy="dna",
                                config=TransformConfig(search=dataclasses.replace(cut, stop_after=None),
                                                       fold_bn=False))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(resumed.eval()(x), straight.eval()(x), rtol=0, atol=1e-6)
    assert [c.after for c in fxadapt.report(resumed).groups] == [c.after for c in fxadapt.report(straight).groups]


def test_search_strategies_need_data(model):
    with pytest.raises(ValueError, match="needs|searches on data"):
        fxadapt.transform(model, 0.5, (X1,), strategy="dna")
