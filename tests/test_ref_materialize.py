"""fxadapt's materializer (``passes.materialize`` on a ``make_plan`` plan) against the reference slicer.

``check_materialize`` is what the hypothesis fuzz (``tests/test_fuzz.py``) runs on every random DAG CNN:

- shrink: the materialized model equals ``refslicer.slice_module`` with the same keep-sets (known from the
  scores given to ``make_plan``, or read back from the plan's site edits) in float64, and its parameters
  have the shapes the documented selection rule gives (``refslicer.param_shapes``);
- grow: copies only add zero-read channels, so the result still equals the reference sliced model (the
  original, when nothing shrinks);
- cost: ``Analysis.macs``/``params`` at the new widths equal FlopCounterMode MACs and the parameter count;
- ``fold_bn`` on the materialized model (eval mode) leaves the output unchanged.

The mutation tests below break the materializer or the BN folding in a test-local way (monkeypatch) and
assert that the same check then fails: the comparison can fail.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import refslicer
import torch
from fxadapt.passes import fold_bn as fold_bn_mod
from fxadapt.passes import materialize as materialize_mod
from fxadapt.passes.materialize import materialize
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxadapt
from fxadapt import meta
from fxadapt.planning.plan import SiteEdit, growth_blocker, make_plan


def half_flops(model, x) -> float:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def random_units(a, rng, grow: bool = True) -> dict[int, int]:
    """Per prunable group: shrink to 1..units-1, keep, or (when it may grow) grow to units+1..2*units."""
    units = {}
    for g in a.prunable:
        mode = rng.integers(3) if grow and growth_blocker(a, g) is None else rng.integers(2)
        if mode == 0 and g.units > 1:
            units[g.id] = int(rng.integers(1, g.units))
        elif mode == 2:
            units[g.id] = int(rng.integers(g.units + 1, 2 * g.units + 1))
    return units


def check_materialize(a, xb: torch.Tensor, units: dict[int, int], scores: dict | None) -> int:
    """Materialize ``make_plan(a, units, scores=scores)``, compare it with the reference (see above); returns
    how many BatchNorms ``fold_bn`` folded."""
    plan = make_plan(a, units, scores=scores)
    gm = materialize(a.gm, plan).graph_module.eval()
    if scores is not None:
        select = refslicer.selections(units, scores)
        keep = {gid: set(sel[:n].tolist()) for gid, sel in select.items()
                if (n := a.groups[gid].units) > units[gid]}
        kept = refslicer.kept_from_plan(a, plan)
        assert {gid: kept.get(gid) for gid in keep} == keep, "kept units differ from the top scores"
        shapes = refslicer.param_shapes(a, select)
        got = {k: tuple(v.shape) for k, v in gm.state_dict().items() if k in shapes}
        assert got == shapes
    else:
        keep = {gid: k for gid, k in refslicer.kept_from_plan(a, plan).items()
                if len(k) < a.groups[gid].units}
        assert {gid: len(k) for gid, k in keep.items()} \
                == {g: n for g, n in units.items() if n < a.groups[g].units}
    with torch.no_grad():
        y = gm(xb)
        refslicer.assert_same_function(y, refslicer.slice_module(a, keep)(xb), "materialized vs reference")
        widths = {gid: n * a.groups[gid].granularity for gid, n in units.items()}
        assert a.macs(channels=widths) == half_flops(gm, xb[:1]), "cost model vs FlopCounterMode"
        assert a.params(channels=widths) == n_params(gm)
        res = fold_bn_mod.fold_bn(gm)
        bns = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
        left = [m for m in res.graph_module.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(bns) - len(left) == res.graph_module.meta[meta.FOLDED_BN] \
                and res.modified == (len(left) < len(bns))
        refslicer.assert_same_function(res.graph_module(xb), y, "fold_bn(materialized) vs materialized")
    return len(bns) - len(left)


def _fixed():
    """A fixed fuzz program (conv+BN, residual, SE, depthwise, cat, chunk) and its analysis."""
    from test_fuzz import build

    prog = [("conv", 0, 8, 3, True, True), ("res", 1), ("se", 2, 2), ("dw", 3, 1, True), ("cat", 4, 1),
            ("chunk", 5), ("conv", 6, 6, 1, True, False)]
    net = build(prog, "pool", 0)
    xb = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return net, xb, fxadapt.analyze(net, (xb[:1],))


def _scores(a, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.id: rng.permutation(g.units).astype(float) for g in a.prunable}


def test_fixed_program_shrink_grow_fold_match_reference():
    net, xb, a = _fixed()
    assert len(a.prunable) >= 3
    half = {g.id: max(1, g.units // 2) for g in a.prunable}
    growable = [g for g in a.prunable if growth_blocker(a, g) is None]
    assert growable
    double = {g.id: 2 * g.units for g in growable}
    for units in (half, double, {**half, growable[0].id: 2 * growable[0].units}):
        assert check_materialize(a, xb, units, _scores(a)) == 4
        assert check_materialize(a, xb, units, None) == 4
    gm = materialize(a.gm, make_plan(a, double)).graph_module
    with torch.no_grad():  # growth alone is the original function
        refslicer.assert_same_function(gm(xb), net(xb), "grown vs original")


def _wrong_channels(real):
    """``_edit_param`` that keeps the first ``n`` positions of a shrunk site instead of the planned ones."""
    def edit(gm, e, cfg, gen):
        n = len(e.index)
        size = len(e.site.labels)
        if not e.new.any() and n < size and not np.array_equal(e.index, np.arange(n)):
            e = SiteEdit(e.site, np.arange(n), e.new)
        real(gm, e, cfg, gen)
    return edit


def _no_zeroed_copies(real):
    """``_edit_param`` whose grown consumer (``in``) positions keep the copied weights instead of zeros."""
    def edit(gm, e, cfg, gen):
        if e.site.role == "in" and e.new.any():
            e = SiteEdit(e.site, e.index, np.zeros_like(e.new))
        real(gm, e, cfg, gen)
    return edit


def test_mutation_wrong_kept_channels_is_caught(monkeypatch):
    _, xb, a = _fixed()
    half = {g.id: max(1, g.units // 2) for g in a.prunable}
    monkeypatch.setattr(materialize_mod, "_edit_param", _wrong_channels(materialize_mod._edit_param))
    with pytest.raises(AssertionError, match="materialized vs reference"):
        check_materialize(a, xb, half, _scores(a))


def test_mutation_nonzero_grown_consumers_is_caught(monkeypatch):
    _, xb, a = _fixed()
    double = {g.id: 2 * g.units for g in a.prunable if growth_blocker(a, g) is None}
    monkeypatch.setattr(materialize_mod, "_edit_param", _no_zeroed_copies(materialize_mod._edit_param))
    with pytest.raises(AssertionError, match="materialized vs reference"):
        check_materialize(a, xb, double, _scores(a))


def test_mutation_bn_fold_without_mean_is_caught(monkeypatch):
    """A fold that forgets the running mean (folds a copy whose means are zero) is caught."""
    _, xb, a = _fixed()
    real = fold_bn_mod.fold_bn

    def fold_ignoring_mean(gm, *args):
        gm = copy.deepcopy(gm)
        for m in gm.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
        return real(gm, *args)

    monkeypatch.setattr(fold_bn_mod, "fold_bn", fold_ignoring_mean)
    with pytest.raises(AssertionError, match="fold_bn"):
        check_materialize(a, xb, {g.id: max(1, g.units // 2) for g in a.prunable}, _scores(a))


def test_mutation_of_the_plan_selection_is_caught(monkeypatch):
    """make_plan ignoring ``scores`` (keeping L1-top units instead) is caught by the keep-set check."""
    _, xb, a = _fixed()
    real = make_plan
    monkeypatch.setattr(sys.modules[__name__], "make_plan", lambda a_, u, scores=None: real(a_, u))
    with pytest.raises(AssertionError, match="kept units differ"):
        check_materialize(a, xb, {g.id: max(1, g.units // 2) for g in a.prunable}, _scores(a, 1))


def test_growing_one_weight_per_channel_by_one_unit():
    """Regression: the growth noise used std() of one element (NaN), and NaN * a zero consumer weight is
    NaN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1)).double().eval()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a = fxadapt.analyze(net, (x[:1],))
    gm = materialize(a.gm, make_plan(a, {0: 5})).graph_module
    with torch.no_grad():
        refslicer.assert_same_function(gm(x), net(x), "grown by one unit vs original")
