"""``strategy="importance"`` (and ``"auto"`` with data) under a latency budget, judged on a simulated
processor (``fxadapt.hw.sim``) by the simulator's own latency of the returned model."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import LatencyNet

import fxadapt
from fxadapt.errors import BudgetError
from fxadapt.hw.sim import SimulatedTarget

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
G = torch.Generator().manual_seed(1)
DATA = (torch.randn(192, 3, 16, 16, generator=G), torch.randint(0, 10, (192,), generator=G))
FAST = fxadapt.ImportanceConfig(steps=6, batch_size=32, calib_batches=2)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LatencyNet().eval()


@pytest.mark.parametrize("strategy", ["importance", "auto"])
def test_importance_latency_budget_lands_in_the_window(net, strategy):
    t = SimulatedTarget(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fxadapt.transform(net, fxadapt.Budget(latency=0.5, target=t), (X,), data=DATA,
                                strategy=strategy, importance=FAST)
    assert type(out) is LatencyNet
    ratio = t.seconds(out, (X,)) / t.seconds(net, (X,))      # the simulator's latency, not the solver's
    assert 0.9 * 0.5 * 0.98 <= ratio <= 0.5 * 1.02
    r = fxadapt.report(out)
    assert any("latency repaired" in str(h.get("searched", "")) for h in r.history)
    assert sum("step" in h for h in r.history) == FAST.steps     # every distillation step counted once
    assert "latency (measured on the target)" in r.table()


def test_importance_refuses_budgets_together(net):
    with pytest.raises(BudgetError, match="alone"):
        fxadapt.transform(net, fxadapt.Budget(latency=0.8, macs=0.4, target=SimulatedTarget()), (X,),
                          data=DATA, strategy="importance", importance=FAST)
