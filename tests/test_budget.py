"""Budgets: accepted forms, clear errors, solver options, and the solver landing within 1% on the right side
(aligned widths, coarse models and strictness: test_solver.py)."""

from __future__ import annotations

import math

import pytest
import torch
from models import ResNetTiny

import fxadapt
from fxadapt.errors import BudgetError
from fxadapt.planning.budget import Budget, SolveConfig, parse_budget, reachable, solve_widths


@pytest.mark.parametrize("budget,expected", [
    (0.5, 500.0), (2, 2000.0), ("50%", 500.0), ("150%", 1500.0), ("300", 300.0), ("0.25", 250.0),
    ("3K", 3000.0), ("1.5M", 1.5e6), ("2G", 2e9), ("2GMACs", 2e9), (Budget(macs=0.5), 500.0),
    (Budget(macs="400"), 400.0), (Budget(macs_abs=400), 400.0), (Budget(macs="40%"), 400.0),
    (Budget(macs=16), 16000.0),
])
def test_parse_forms(budget, expected):
    assert parse_budget(budget, 1000.0, 10.0).macs == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "fast", [0.5], None, "-5%", Budget()])
def test_parse_rejects(bad):
    with pytest.raises(BudgetError):
        parse_budget(bad, 1000.0, 10.0)


def test_budget_numbers_are_fractions_and_counts_say_so():
    with pytest.raises(BudgetError, match=r"fraction of the original \(20x\); for a count write macs='20'"):
        Budget(macs=20)
    with pytest.raises(BudgetError, match="params_abs="):
        Budget(params=5e6)
    with pytest.raises(BudgetError, match="not both"):
        Budget(macs=0.5, macs_abs=100)
    goal = parse_budget(Budget(macs="2.5K", params_abs=5), 1000.0, 10.0)
    assert (goal.macs, goal.params) == (2500.0, 5.0)


@pytest.fixture(scope="module")
def analysis():
    return fxadapt.analyze(ResNetTiny().eval(), (torch.randn(1, 3, 16, 16),))


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.8, 1.0, 1.3, 2.0, 3.0])
def test_solver_window(analysis, ratio):
    base = analysis.macs()
    units = solve_widths(analysis, ratio * base)
    got = analysis.cost.macs(units)
    if ratio <= 1:
        assert 0.99 * ratio * base <= got <= ratio * base
    else:
        assert ratio * base <= got <= 1.01 * ratio * base
    assert all(u >= 1 for u in units.values())


def test_out_of_range_names_the_range(analysis):
    lo, hi = reachable(analysis, SolveConfig(max_expand=2.0))
    with pytest.raises(BudgetError, match=r"reachable range \[.*\].*x"):
        solve_widths(analysis, hi * 1.5, SolveConfig(max_expand=2.0))
    with pytest.raises(BudgetError, match="reachable range"):
        solve_widths(analysis, lo * 0.5)


def test_solver_names_stay_importable_from_budget():
    from fxadapt.planning import budget, solver

    for name in ("TOL", "SolveConfig", "solve_widths", "fit", "reachable", "in_window", "check_window"):
        assert getattr(budget, name) is getattr(solver, name)
    assert issubclass(budget.BudgetWarning, UserWarning) and budget.TOL == 0.01


@pytest.mark.parametrize("kwargs",
                         [{"tol": -0.1}, {"tol": 1.0}, {"tol": "1%"}, {"align": 0}, {"align": "fast"},
                                    {"align": 2.5}, {"align": True}])
def test_solve_config_rejects(kwargs):
    with pytest.raises(BudgetError):
        SolveConfig(**kwargs)


def test_in_window_edges():
    from fxadapt.planning.budget import in_window

    assert in_window(990, 1000, False) and in_window(1000, 1000, False) and not in_window(989, 1000, False)
    assert not in_window(1000.5, 1000, False) and not in_window(999, 1000, True)
    assert in_window(1010, 1000, True) and not in_window(1011, 1000, True)
    assert in_window(950, 1000, False, tol=0.05) and not in_window(949, 1000, False, tol=0.05)


def test_non_strict_is_silent_when_the_window_holds(analysis):
    import warnings

    from fxadapt.planning.budget import BudgetWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetWarning)
        solve_widths(analysis, 0.5 * analysis.macs())
        solve_widths(analysis, 0.5 * analysis.macs(), SolveConfig(strict=True))
