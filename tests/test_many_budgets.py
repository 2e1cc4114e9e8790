"""Many budgets in one ``transform`` call: one model per budget, in order, each verified like a single
result (MACs by an independent count, the user's class, its own report), DNA trained once."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import ResNetTiny

import fxadapt
import fxadapt.search.many as many
from fxadapt.analysis.count import count_macs
from fxadapt.errors import BudgetError, InputError
from fxadapt.hw.sim import SimulatedTarget
from fxadapt.search.dna import SearchConfig

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
G = torch.Generator().manual_seed(1)
DATA = (torch.randn(128, 3, 8, 8, generator=G), torch.randint(0, 5, (128,), generator=G))
FAST = SearchConfig(steps=16, warmup=4, batch_size=32, progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ResNetTiny().eval()


def ratio(out, model) -> float:
    return count_macs(out, (X,)) / count_macs(model, (X,))


def test_datafree_budgets_in_order_each_verified(model):
    outs = fxadapt.transform(model, [0.75, 0.25, 0.5], (X,))
    assert [type(o) for o in outs] == [ResNetTiny] * 3
    for out, b in zip(outs, (0.75, 0.25, 0.5)):
        assert 0.95 * b <= ratio(out, model) <= b
        assert fxadapt.report(out).macs_after == pytest.approx(count_macs(out, (X,)), rel=1e-6)
        assert out(torch.randn(4, 3, 8, 8)).shape == (4, 5)


def test_dna_trains_one_supernet_for_every_budget(model, monkeypatch):
    calls = []
    real = many.run_search

    def counted(sn, train, val, target, *rest):
        calls.append(target)
        return real(sn, train, val, target, *rest)

    monkeypatch.setattr(many, "run_search", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = fxadapt.transform(model, [0.25, 0.5], (X,), data=DATA, strategy="dna", search=FAST)
    base = count_macs(model, (X,))
    assert len(calls) == 1 and calls[0] == pytest.approx((0.25 * 0.5) ** 0.5 * base, rel=1e-6)
    for out, b in zip(outs, (0.25, 0.5)):
        assert type(out) is ResNetTiny and 0.95 * b <= ratio(out, model) <= b
        hist = fxadapt.report(out).history
        assert any("shared_budget" in h for h in hist) and any("gate_step" in h for h in hist)
    assert [c.after for c in fxadapt.report(outs[0]).groups] \
            != [c.after for c in fxadapt.report(outs[1]).groups]


def test_mixed_latency_and_mac_budgets_datafree(model):
    t = SimulatedTarget(seed=2)
    outs = fxadapt.transform(model, [0.5, fxadapt.Budget(latency=0.9, target=t)], (X,))
    assert 0.95 * 0.5 <= ratio(outs[0], model) <= 0.5
    assert 0.9 * 0.88 <= t.seconds(outs[1], (X,)) / t.seconds(model, (X,)) <= 0.9 * 1.02


def test_bad_lists_are_clear_errors(model):
    with pytest.raises(InputError, match="at least one budget"):
        fxadapt.transform(model, [], (X,))
    with pytest.raises(BudgetError, match="all shrink or all grow"):
        fxadapt.transform(model, [0.5, 1.5], (X,), data=DATA, strategy="dna", search=FAST)


def test_bench_with_data_shows_searched_and_datafree_models(model, tmp_path):
    from fxadapt.export.bench import BenchData, benchmark
    from fxadapt.hw.target import Target

    data = BenchData(DATA, (DATA[0][:64], DATA[1][:64]), {"strategy": "dna", "search": FAST},
                     finetune_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = benchmark(model, (X,), [0.25, 0.5], [Target(runtime="torch")], runs=3, progress=False,
                        data=data)
    assert [r["budget"] for r in res.rows] \
            == ["original", "datafree 0.25", "datafree 0.5", "dna 0.25", "dna 0.5"]
    assert [r["method"] for r in res.rows] == ["original", "datafree", "datafree", "dna", "dna"]
    for r in res.rows[1:]:
        b = float(r["budget"].split()[-1])
        assert 0.95 * b <= r["macs_ratio"] <= b and 0.0 <= r["accuracy"] <= 1.0
    png = res.plot(str(tmp_path / "p.png"))
    import matplotlib.image as mpimg

    h, w = mpimg.imread(png).shape[:2]
    assert h > w                                      # two panel rows: latency vs MACs, accuracy vs latency
    assert "top-1" in res.table()


def test_dna_list_mixing_mac_and_latency_budgets(model, monkeypatch):
    """MAC budgets share one supernet; the latency budget gets its own search (expected latency in the
    loss)."""
    calls = []
    real = many.run_search
    monkeypatch.setattr(many, "run_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = SimulatedTarget(seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = fxadapt.transform(model, [0.25, fxadapt.Budget(latency=0.9, target=t), 0.5], (X,), data=DATA,
                                 strategy="dna", search=FAST)
    assert len(calls) == 1 and len(outs) == 3
    assert 0.95 * 0.25 <= ratio(outs[0], model) <= 0.25 and 0.95 * 0.5 <= ratio(outs[2], model) <= 0.5
    assert t.seconds(outs[1], (X,)) / t.seconds(model, (X,)) <= 0.9 * 1.02
    assert any("expected latency" in str(h.get("searched", "")) for h in fxadapt.report(outs[1]).history)
