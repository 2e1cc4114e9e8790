"""Params budgets alone and together with MAC budgets (``fxadapt.pipeline.params``): both land by independent
counts (``count_macs`` for MACs, the sum of ``numel`` of the result's parameters), experts of a mixture of
experts go first where the parameters bind, an impossible pair is a one-line ``BudgetError`` naming the
reachable parameters at that MAC budget, and a params solve speaks of parameters, not MACs."""

from __future__ import annotations

import warnings

import pytest
import torch
from moe_models import E, H, I, K, V, ids, mixtral  # noqa: E402,F401,E741

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.errors import BudgetError
from fxadapt.planning.budget import BudgetWarning

transformers = pytest.importorskip("transformers")
_MOE = hasattr(transformers, "MixtralConfig") and hasattr(transformers.models.mixtral.modeling_mixtral,
                                                          "MixtralExperts")
needs_moe = pytest.mark.skipif(not _MOE, reason="this transformers has no 3-D MixtralExperts")

_mixtral, _ids = mixtral, ids



def _n_params(m):
    return sum(p.numel() for p in m.parameters())


def _quiet(model, budget, inputs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxadapt.transform(model, budget, inputs, **kw)


class _CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                                        torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1),
                                        torch.nn.BatchNorm2d(64), torch.nn.ReLU(), torch.nn.Conv2d(64, 48, 3))
        self.head = torch.nn.Linear(48, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


@needs_moe
def test_macs_and_params_both_hold_on_mixtral():
    """``Budget(macs=0.5, params=0.3)``: the MACs alone would leave ~0.45x of the parameters, so the
    parameters bind: experts are removed (never below top_k) and the channels shrink within the MAC solution,
    landing the parameters in ``[0.99, 1] * 0.3`` and the MACs at or below 0.5, both counted independently."""
    model, ids = _mixtral(), _ids()
    small = _quiet(model, fxadapt.Budget(macs=0.5, params=0.3), {"input_ids": ids})
    assert isinstance(small, transformers.MixtralForCausalLM)
    macs = count_macs(small, {"input_ids": ids}) / count_macs(model, {"input_ids": ids})
    params = _n_params(small) / _n_params(model)
    assert macs <= 0.5 and 0.99 * 0.3 <= params <= 0.3
    counts = [layer.mlp.experts.num_experts for layer in small.model.layers]
    assert min(counts) >= K and sum(counts) < 2 * E
    r = fxadapt.report(small)
    assert r.history[0]["binding"] == "params" and r.params_after == _n_params(small)
    assert small.generate(ids[:, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@needs_moe
def test_macs_bind_when_params_are_loose():
    """A params budget the MAC solution already meets changes nothing: MACs in their window, experts kept."""
    model, ids = _mixtral(), _ids()
    small = _quiet(model, fxadapt.Budget(macs=0.5, params=0.9), {"input_ids": ids})
    macs = count_macs(small, {"input_ids": ids}) / count_macs(model, {"input_ids": ids})
    assert 0.99 * 0.5 <= macs <= 0.5 and _n_params(small) <= 0.9 * _n_params(model)
    assert [layer.mlp.experts.num_experts for layer in small.model.layers] == [E, E]
    assert "binding" not in fxadapt.report(small).history[0]


@needs_moe
def test_impossible_pair_names_the_reachable_params():
    model, ids = _mixtral(), _ids()
    with pytest.raises(BudgetError,
                       match=r"at the MAC budget of [\d,]+ the reachable parameters are \[[\d,]+, "
                                          r"[\d,]+\] = \[0\.\d+x, 0\.\d+x\] of the original") as info:
        _quiet(model, fxadapt.Budget(macs=0.5, params=0.01), {"input_ids": ids})
    assert "\n" not in str(info.value) and str(info.value).endswith("give a larger params=")
    with pytest.raises(BudgetError,
                       match=r"growing to [\d,]+ MACs takes [\d,]+ parameters, above the params"):
        _quiet(model, fxadapt.Budget(macs=1.5, params=0.5), {"input_ids": ids})


def test_params_only_on_a_cnn_lands_in_the_window():
    """No experts: the width solver on the parameter count; counted by ``numel`` the result lies in
    ``[0.99, 1] * 0.4``, and it is the user's class."""
    model, x = _CNN().eval(), torch.randn(1, 3, 16, 16)
    small = _quiet(model, fxadapt.Budget(params=0.4), (x,))
    assert isinstance(small, _CNN)
    assert 0.99 * 0.4 <= _n_params(small) / _n_params(model) <= 0.4
    assert count_macs(small, (x,)) < count_macs(model, (x,))


def test_cnn_macs_and_params_together():
    """A plain CNN under both: the parameters bind (a 0.8 MAC solve keeps ~0.8x of the parameters) and land
    in their window while the MACs stay under theirs."""
    model, x = _CNN().eval(), torch.randn(1, 3, 16, 16)
    small = _quiet(model, fxadapt.Budget(macs=0.8, params=0.5), (x,))
    assert count_macs(small, (x,)) <= 0.8 * count_macs(model, (x,))
    assert 0.99 * 0.5 <= _n_params(small) / _n_params(model) <= 0.5


def test_params_solve_speaks_of_parameters():
    """Out of reach and out of the window, a params solve's error and warning count parameters."""
    model, x = _CNN().eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(BudgetError, match=r"budget of [\d,]+ parameters \(0\.001x\) is outside the reachable "
                                          r"range \[[\d,]+, [\d,]+\] parameters") as info:
        fxadapt.transform(model, fxadapt.Budget(params=0.001), (x,))
    assert "MACs" not in str(info.value)
    tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    with pytest.warns(BudgetWarning, match=r"parameters landed at 0\.\d{3}x for a budget of 0\.500x.*"
                                           r"params elasticity") as rec:
        fxadapt.transform(tiny, fxadapt.Budget(params=0.5), (torch.randn(1, 3, 8, 8),),
                          solve=fxadapt.SolveConfig(align=1))
    assert not any("MAC" in str(w.message) for w in rec if issubclass(w.category, BudgetWarning))
    with pytest.raises(BudgetError, match=r"no widths within 1% of the budget of [\d,]+ parameters"):
        fxadapt.transform(tiny, fxadapt.Budget(params=0.5), (torch.randn(1, 3, 8, 8),),
                          solve=fxadapt.SolveConfig(align=1, strict=True))
