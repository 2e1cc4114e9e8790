"""fxadapt.transform end to end: budgets met, function kept where promised, the returned-module contract,
and clear errors on bad input."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from models import ResNetTiny, resnet_tiny_macs
from torch import nn
from transform_harness import hand_macs

import fxadapt
from fxadapt.pipeline.transform import TransformConfig
from fxadapt.planning.budget import SolveConfig

X = torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def model():
    return ResNetTiny().eval()


def test_hand_count_is_right(model):
    """The independent count used below, on a model whose MACs are written out by hand."""
    assert hand_macs(model, X) == resnet_tiny_macs()
    assert hand_macs(fxadapt.capture(model, (X,)), X) == resnet_tiny_macs()
    assert hand_macs(nn.Linear(4, 3), torch.randn(2, 7, 4)) == 2 * 7 * 3 * 4
    with pytest.raises(AssertionError, match="cannot count"):
        hand_macs(nn.ConvTranspose2d(3, 2, 3), X)


@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75, 1.5, 2.0])
def test_budget_met_and_measured_independently(model, budget):
    out = fxadapt.transform(model, budget, (X,))
    macs, base = hand_macs(out, X), resnet_tiny_macs()
    lo, hi = (budget, budget * 1.01) if budget > 1 else (budget * 0.99, budget)
    assert lo * base <= macs <= hi * base
    rep = fxadapt.report(out)
    assert rep.macs_after == macs and rep.macs_before == base
    assert out(torch.randn(3, 3, 16, 16)).shape == (3, 5)


def test_identity_budget_is_exact(model):
    out = fxadapt.transform(model, 1.0, (X,), fold_bn=False)
    torch.testing.assert_close(out(X), model(X), rtol=0, atol=0)
    assert all(c.before == c.after for c in fxadapt.report(out).groups)


@pytest.mark.parametrize("budget", [1.5, 2.0])
def test_growth_preserves_function(model, budget):
    out = fxadapt.transform(model, budget, (X,))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)


def test_input_model_never_mutated(model):
    before = copy.deepcopy(model.state_dict())
    model.train()
    fxadapt.transform(model, 0.5, (X,))
    assert model.training
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_returned_module_contract(model):
    out = fxadapt.transform(model, 0.5, (X,), fold_bn=False)
    x = torch.randn(4, 3, 16, 16)
    out.train()
    opt = torch.optim.SGD(out.parameters(), lr=0.1)
    w0 = next(out.parameters()).detach().clone()
    loss = nn.functional.cross_entropy(out(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert not torch.equal(w0, next(out.parameters()))
    out.eval()
    y = out(x)
    clone = copy.deepcopy(out)
    torch.testing.assert_close(clone(x), y)
    buf = io.BytesIO()
    torch.save(out.state_dict(), buf)
    buf.seek(0)
    clone.load_state_dict(torch.load(buf))
    torch.testing.assert_close(clone(x), y)
    again = pickle.loads(pickle.dumps(out))
    torch.testing.assert_close(again(x), y)
    assert "MACs" in str(fxadapt.report(again))


def test_bn_kept_by_default_folded_on_request(model):
    kept = fxadapt.transform(model, 0.5, (X,))
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in kept.modules()) == sum(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = fxadapt.transform(model, 0.5, (X,), fold_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    assert [n for n, _ in fxadapt.report(out).timings].count("fold_bn") == 1
    torch.testing.assert_close(out(X), kept.eval()(X), rtol=1e-4, atol=1e-5)
    cfg = TransformConfig(fold_bn=False)  # an explicit keyword overrides the config (it used to be ignored)
    folded = fxadapt.transform(model, 0.5, (X,), config=cfg, fold_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_model_in_train_mode_with_fold_bn_warns_and_returns_eval(model):
    model.train()
    try:
        with pytest.warns(UserWarning, match="train mode"):
            out = fxadapt.transform(model, 0.5, (X,), fold_bn=True)
        assert not out.training
        assert fxadapt.transform(model, 0.5, (X,)).training  # BN kept: the caller's mode is kept
    finally:
        model.eval()


def test_unknown_strategy_and_missing_data_are_fxadapt_errors(model):
    with pytest.raises(fxadapt.FxAdaptError, match="TransformConfig.strategy must be one of .*; got 'magic'"):
        fxadapt.transform(model, 0.5, (X,), strategy="magic")
    with pytest.raises(fxadapt.FxAdaptError, match="searches on data"):
        fxadapt.transform(model, 0.5, (X,), strategy="dna")
    with pytest.raises(fxadapt.FxAdaptError, match="unknown transform option"):
        fxadapt.transform(model, 0.5, (X,), fold_bm=True)


def test_model_without_layers_says_why():
    with pytest.raises(fxadapt.BudgetError, match=r"no prunable channel group: .+"):
        fxadapt.transform(nn.Sequential(nn.ReLU()), 0.5, (torch.randn(1, 3),))


@pytest.mark.parametrize("budget", [0, -0.5, math.nan, math.inf, "lots", None])
def test_bad_budgets(model, budget):
    with pytest.raises(fxadapt.BudgetError):
        fxadapt.transform(model, budget, (X,))


def test_budget_out_of_reach_states_range(model):
    cfg = TransformConfig(solve=SolveConfig(max_expand=2.0))
    with pytest.raises(fxadapt.BudgetError, match=r"reachable range"):
        fxadapt.transform(model, 12.0, (X,), config=cfg)
    with pytest.raises(fxadapt.BudgetError, match=r"reachable range"):
        fxadapt.transform(model, 0.001, (X,))


def test_wrong_inputs(model):
    with pytest.raises(fxadapt.InputError, match="fails on the example inputs"):
        fxadapt.transform(model, 0.5, (torch.randn(1, 4, 16, 16),))
    with pytest.raises(fxadapt.InputError, match="tuple"):
        fxadapt.transform(model, 0.5, [X])


def test_no_prunable_group():
    with pytest.raises(fxadapt.BudgetError, match="no prunable"):
        fxadapt.transform(nn.Linear(4, 3), 0.5, (torch.randn(2, 4),))


def test_unknown_strategy(model):
    with pytest.raises(ValueError, match="TransformConfig.strategy must be one of"):
        fxadapt.transform(model, 0.5, (X,), strategy="magic")


@pytest.mark.parametrize("budget", [1.5, 2.0])
def test_width_and_depth_growth_preserves_function(model, budget):
    cfg = TransformConfig(grow_depth=True)
    out = fxadapt.transform(model, budget, (X,), config=cfg)
    rep = fxadapt.report(out)
    assert len(rep.blocks_added) == 2 and not rep.blocks_removed
    assert budget <= hand_macs(out, X) / resnet_tiny_macs() <= budget * 1.01
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
