"""passes.materialize (widths) + passes.rewire_blocks (``apply_plan``: blocks): counts of edited sites/nodes,
numerics vs the original, and float64 equality with the reference slicer (``tests/refslicer.py``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fxadapt.passes.materialize import apply_plan, materialize
from fxadapt.passes.rewire_blocks import repeat_blocker
from fxadapt.passes.shape_check import shape_check
from models import CatSplit, ResNetTiny
from test_ref_materialize import check_materialize
from transform_harness import hand_macs

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.planning.plan import growth_blocker, make_plan

torch.manual_seed(0)
X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def res():
    m = ResNetTiny().eval()
    return m, fxadapt.analyze(m, (X,))


def modules_of(gm, kind):
    return sum(isinstance(gm.get_submodule(n.target), kind) for n in gm.graph.nodes if n.op == "call_module")


def test_identity_plan_is_exact(res):
    m, a = res
    plan = make_plan(a, {})
    assert plan.edits == ()
    out = materialize(a.gm, plan)
    assert not out.modified
    torch.testing.assert_close(out.graph_module(X), m(X), rtol=0, atol=0)


def test_shrink_matches_cost_model_and_flop_counter(res):
    m, a = res
    units = {g.id: g.units // 2 for g in a.prunable}
    plan = make_plan(a, units)
    assert len(plan.edits) == sum(len(g.members) for g in a.prunable)
    out = materialize(a.gm, plan).graph_module
    shape_check(out, (X[:1],))
    assert out(X).shape == (2, 5)
    assert count_macs(out, (X,)) == a.cost.macs(units)
    assert modules_of(out, torch.nn.Conv2d) == modules_of(a.gm, torch.nn.Conv2d) == 8


def test_width_growth_preserves_function(res):
    m, a = res
    grow = {g.id: g.units * 2 for g in a.prunable if growth_blocker(a, g) is None}
    assert len(grow) == len(a.prunable) == 5
    out = materialize(a.gm, make_plan(a, grow)).graph_module
    shape_check(out, (X[:1],))
    assert out.get_submodule("stem.0").weight.shape[0] == 16
    torch.testing.assert_close(out(X), m(X), rtol=1e-5, atol=1e-6)
    assert count_macs(out, (X,)) == a.cost.macs(grow)


def test_depth_growth_and_removal(res):
    m, a = res
    removable = [b for b in a.blocks if b.removable]
    assert [(b.entry, b.exit) for b in a.blocks] \
            == [("relu", "add"), ("relu_2", "add_1"), ("relu_4", "add_2")]
    assert len(removable) == 2 and not a.blocks[2].removable
    assert all(repeat_blocker(a.gm, b) is None for b in removable)
    plan = make_plan(a, {}, repeat={removable[0].id: 2})
    out = apply_plan(a.gm, plan).graph_module
    n_conv = modules_of(out, torch.nn.Conv2d)
    assert n_conv == 8 + 2 * 2
    torch.testing.assert_close(out(X), m(X), rtol=1e-5, atol=1e-6)
    gone = apply_plan(a.gm, make_plan(a, {}, remove={b.id for b in removable})).graph_module
    assert modules_of(gone, torch.nn.Conv2d) == 8 - 4
    shape_check(gone, (X[:1],))
    assert count_macs(gone, (X,)) == a.cost.macs(None, {b.id: 0 for b in removable})


def test_width_and_depth_growth_together(res):
    m, a = res
    grow = {g.id: g.units + 3 for g in a.prunable}
    plan = make_plan(a, grow, repeat={b.id: 1 for b in a.blocks if b.repeatable})
    out = apply_plan(a.gm, plan).graph_module
    assert modules_of(out, torch.nn.Conv2d) == 8 + 2 * sum(b.repeatable for b in a.blocks) > 8
    torch.testing.assert_close(out(X), m(X), rtol=1e-5, atol=1e-6)


def test_cat_chunk_depthwise_flatten_shrink_and_grow():
    m = CatSplit().eval()
    a = fxadapt.analyze(m, (X,))
    assert sorted(g.width for g in a.prunable) == [4, 4, 6, 6, 6, 10]
    units = {g.id: max(1, g.units - 2) for g in a.prunable}
    out = materialize(a.gm, make_plan(a, units)).graph_module
    shape_check(out, (X[:1],))
    assert out(X).shape == (2, 3)
    assert out.get_submodule("dw.0").groups == out.get_submodule("dw.0").in_channels == 12
    assert count_macs(out, (X,)) == a.cost.macs(units)
    growable = {g.id: g.units + 2 for g in a.prunable if growth_blocker(a, g) is None}
    assert growable
    grown = materialize(a.gm, make_plan(a, growable)).graph_module
    torch.testing.assert_close(grown(X), m(X), rtol=1e-5, atol=1e-6)


def test_caller_graph_module_untouched(res):
    m, a = res
    before = copy.deepcopy(a.gm.state_dict())
    materialize(a.gm, make_plan(a, {g.id: 1 for g in a.prunable}))
    after = a.gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("make", [ResNetTiny, CatSplit])
def test_shrink_and_grow_equal_reference_slicer(make):
    """float64: half of every group (kept by L1 and by given scores) and growth equal tests/refslicer.py."""
    torch.manual_seed(0)
    m = make().double().eval()
    xb = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    a = fxadapt.analyze(m, (xb[:1],))
    rng = np.random.default_rng(0)
    scores = {g.id: rng.permutation(g.units).astype(float) for g in a.prunable}
    half = {g.id: max(1, g.units // 2) for g in a.prunable}
    grow = {g.id: g.units + 2 for g in a.prunable if growth_blocker(a, g) is None}
    for units in (half, grow, {**half, **dict(list(grow.items())[:1])}):
        check_materialize(a, xb, units, scores)
        check_materialize(a, xb, units, None)
    assert hand_macs(materialize(a.gm, make_plan(a, half)).graph_module, xb) == 3 * a.macs(channels=
        {g: n * a.groups[g].granularity for g, n in half.items()})
